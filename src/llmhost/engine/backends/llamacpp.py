"""`--engine llamacpp` (`pip install llmhost[llamacpp]`): a GGUF file run by llama-cpp-python on
the CPU, with llama.cpp's quantized kernels and none of the conversion to float32.

It plugs into the same scheduler as the transformers engine: llama.cpp evaluates tokens and
hands back logits; llmhost's own sampling, stop strings, UTF-8-safe detokenization, queue and
cancellation run on top, so both engines behave alike for every front end. Concurrent requests
are decoded together with llama.cpp's multi-sequence batching, one slot each, up to
--max-concurrency; the rest wait in the queue (llmhost_queue_length in /metrics). Each slot keeps
its last request's KV cache, so a conversation's next turn prefills only what is new.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.backends import ggml_cpu, ggml_repack
from llmhost.engine.backends.gguf import GGUFReadError, check_readable
from llmhost.engine.backends.prefix import common_prefix
from llmhost.engine.local import LocalEngine
from llmhost.engine.ref import ModelRef
from llmhost.engine.template import ChatTemplate, control_tokens
from llmhost.errors import LlmhostError
from llmhost.hardware import physical_cores

log = logging.getLogger("llmhost.llamacpp")

INSTALL = "pip install 'llmhost[llamacpp]' (builds llama-cpp-python from source, about 7 minutes on 2 cores)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class _Decoder:
    """llama.cpp's detokenizer with the `decode` signature the shared text code expects."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = self.llm.detokenize(list(ids), special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


def kv_bytes_per_token(llm: Any) -> int:
    """f16 keys and values of every layer, for one token."""
    import llama_cpp

    model = llm.model
    head_dim = llama_cpp.llama_model_n_embd(model) // max(1, llama_cpp.llama_model_n_head(model))
    return llama_cpp.llama_model_n_layer(model) * 2 * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2


#: A request's window when neither --context-length nor --kv-cache-gib says otherwise: each of
#: the --max-concurrency slots keeps a KV stream this long (Ollama's default is 4096 too).
DEFAULT_SLOT_TOKENS = 4096
#: Prompts are evaluated in blocks of this many positions, and slots share whole blocks only.
PREFILL_BLOCK = 64
#: A long prompt is prefilled this many tokens at a time, with a decode step of the running
#: requests in between (≈0.35 s of the embedded model's prefill on 2 cores): they pause for a
#: chunk, not for the whole prompt.
PREFILL_CHUNK = 2 * PREFILL_BLOCK


def slot_tokens(llm: Any, window: int, explicit: bool, kv_gib: float | None, slots: int) -> int:
    """Tokens each slot's KV stream holds (the most one request may span): the model's window up
    to DEFAULT_SLOT_TOKENS (all of it when --context-length asks); with `kv_gib`, what that buys
    divided among the slots, at most the window."""
    if kv_gib is None:
        return window if explicit else min(window, DEFAULT_SLOT_TOKENS)
    per_slot = min(window, int(kv_gib * 2**30 // kv_bytes_per_token(llm)) // slots)
    if per_slot < 4 * PREFILL_BLOCK:
        raise LlmhostError(
            f"--kv-cache-gib {kv_gib:g} gives each of the {slots} slots (--max-concurrency) only "
            f"{per_slot} tokens: raise --kv-cache-gib or lower --max-concurrency"
        )
    return per_slot


class LlamaCppRunner:
    """Many sequences per llama.cpp decode call (its multi-sequence batching), each in a slot of
    its own: one KV stream per slot (`kv_unified` off), `slot_tokens` long, as llama-server's
    slots. A finished request's cells stay in its slot as a prompt cache: the next request
    takes the free slot whose tokens share the longest prefix with its prompt (the same
    conversation one turn later, the same system prompt), keeps those cells and prefills only
    the rest; the slot's other cells are freed at once.

    Exactness (greedy replies with a reused prefix equal a cold run's), from what was measured
    on llama.cpp's CPU kernels (tests/test_llamacpp.py checks it):
    - without flash attention, a shared cache gave a request logits off by up to ~26 whenever
      other sequences sat in it at other positions; with it they are bit-identical;
    - in one cache shared by all sequences (`kv_unified`), a sequence's numbers depend on where
      its cells lie: prompts are evaluated in 64-cell tiles (the same prompt at a cell offset
      that is not a multiple of 64 differs by up to 0.7), a decode step splits the cache's
      cells between the threads and adds their partial sums (a sequence whose cells straddle
      the split differs by up to 1.1), and freeing cells lets running sequences' next tokens
      land out of position order (up to 1.5). A stream per slot holds one sequence from cell 0,
      as a cold run does, so none of this happens, and freeing is exact;
    - a position's numbers also depend on which tokens were evaluated with it in one batch:
      ggml's default attention kernels tile prompt blocks of 64 rows and split a lone decode
      step's KV cells between the threads (`ggml_cpu`). Its reference kernels compute every
      position alike in any batch for most quantizations, measured at the first prefill
      (`invariant`): then a slot's cells are reused as they are, token by token, a reply's
      decoded cells included, and a next turn sent at once prefills only its new message.
      Where they do not (K-quants' repacked matmuls vary with the row count), prompts are
      evaluated in blocks of PREFILL_BLOCK positions, only whole blocks are reused (every block
      is the very batch a cold run evaluates), and a reply is evaluated again as prompt blocks
      while the engine is idle (`idle_work`).

    With `exact` off (`--prefix-cache fast`), the default kernels are kept and a reply's decoded
    cells are reused as they are, as llama-server does, whatever they round to.

    The low-level API is used because the binding's `Llama` class decodes one sequence only; that
    object is kept for the model, its tokenizer and metadata.
    """

    device = "cpu"
    #: torch only samples here, row by row (49k-element vectors): with its intra-op threads,
    #: their OpenMP workers spin after each op on the cores llama.cpp's threads need (measured:
    #: 3-8% of single-stream decode speed)
    torch_threads = 1

    def __init__(
        self, llm: Any, slot_tokens: int, slots: int, threads: int, exact: bool = True, reference: bool = True
    ) -> None:
        import llama_cpp

        self.exact = exact
        self.max_batch = slots
        self.slot_tokens = slot_tokens
        self.n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # the binding's defaults
        params.n_ctx = slot_tokens * slots
        params.n_batch = params.n_ubatch = max(PREFILL_BLOCK, slots)
        params.n_seq_max = slots
        params.kv_unified = False  # a stream per slot: see above
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = threads
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp's context chatter, as the binding does
            self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise LlmhostError(
                f"llama.cpp could not create a KV cache of {slots} slots of {slot_tokens} tokens (out of "
                "memory?): lower --kv-cache-gib, --context-length or --max-concurrency"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the tokens in each slot's cells
        self.prompted = [0] * slots  # how many of them were evaluated as a prompt (reusable)
        #: The logits after each slot's last prompt (its first `logits_at` tokens) while those
        #: cells are intact: the same prompt again (a retry, a regenerated reply) decodes at once.
        self.first_logits: list[Any] = [None] * slots
        self.logits_at = [0] * slots  # the length of that prompt, whether or not they are kept
        #: Free slots whose reply is to be evaluated again as prompt blocks while the engine is
        #: idle (`idle_work`): the tokens they hold, prompt and reply.
        self.redo: dict[int, list[int]] = {}
        self.idle_since = [0.0] * slots  # for least recently used among free slots
        self.busy: set[int] = set()
        self.rows: list[int] = []  # the slot of each running row, in the scheduler's order
        self._pending: int | None = None
        self._chunking: Any = None  # the request whose prompt is being prefilled, chunk by chunk
        self.llm = llm
        #: LoRA adapters by id. llama.cpp applies adapters to a whole context, not per sequence,
        #: so each decode call evaluates the rows of one adapter (`step` groups them).
        self.adapters: dict[str, Any] = {}
        self.slot_adapter: list[str | None] = [None] * slots  # what each slot's cells were made with
        self._applied: str | None = None
        #: The context's CPU backends, whose reference kernels `exact` tries (`reference`: the
        #: tests of the other scheme turn them off).
        self.backends = ggml_cpu.cpu_backends(self.ctx) if exact and reference else []
        #: Measured at the first prefill (the engine's warm-up), on the thread that decodes (a
        #: decode from another thread, this constructor's, left later ones a third slower):
        #: whether every position computes alike in any batch, a decode step alone included,
        #: under the reference kernels (then they stay on) ...
        self.invariant: bool | None = None
        #: ... and whether the part of a prompt past its last whole block may be reused token
        #: by token (true where `invariant`).
        self.granular: bool | None = None

    def _measure(self) -> None:
        """Which exactness scheme this model gets here (see the class notes); logged."""
        self.invariant = False
        if self.backends:
            ggml_cpu.set_reference(self.backends, True)
            self.invariant = self._decoded_equal_prefilled()
            if not self.invariant:
                ggml_cpu.set_reference(self.backends, False)
        self.granular = self.invariant or self._rows_independent()
        log.info(
            "llama.cpp, exact prefix cache: %s",
            "reference kernels, every cell reused as it is (a reply's too)"
            if self.invariant
            else "a reply's cells are made reusable while idle; "
            + ("partial blocks reused" if self.granular else "whole blocks reused"),
        )

    def _decoded_equal_prefilled(self) -> bool:
        """Whether a prompt's last logits come out the same evaluated as a partial block then a
        whole one, and as a whole block then decode steps, alone and beside another slot's row
        (a stream copy): every cell took a different batch each way, so a reply's decoded cells
        are then the cells a cold run of the next turn makes, in whatever block it puts them.
        Costs a prefill of 96 tokens, another of 64 and 32 decode steps, once."""
        import llama_cpp

        half = PREFILL_BLOCK // 2
        n = PREFILL_BLOCK + half
        ids = self._probe(n)
        slots = [0, 1] if self.max_batch > 1 else [0]
        for s in slots:
            llama_cpp.llama_memory_seq_rm(self.memory, s, -1, -1)
        for start, end in ((0, half), (half, n)):
            self._decode([(ids[p], p, 0, p == n - 1) for p in range(start, end)])
        prefilled = self._logits(n - 1 - half)
        llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
        self._decode([(t, i, 0, False) for i, t in enumerate(ids[:PREFILL_BLOCK])])
        for s in slots[1:]:
            llama_cpp.llama_memory_seq_cp(self.memory, 0, s, -1, -1)
        for pos in range(PREFILL_BLOCK, n):
            self._decode([(ids[pos], pos, s, pos == n - 1) for s in slots])
        decoded = [self._logits(i) for i in range(len(slots))]
        for s in slots:
            llama_cpp.llama_memory_seq_rm(self.memory, s, -1, -1)
        return all(bool((d == prefilled).all()) for d in decoded)

    def _probe(self, n: int) -> list[int]:
        """`n` ordinary tokens to measure with (which ones does not matter)."""
        return [(i * 7919) % (self.n_vocab - 256) + 128 for i in range(n)]

    def _rows_independent(self) -> bool:
        """Whether llama.cpp computes a position alike in any batch below PREFILL_BLOCK rows for
        this model, here: measured, not assumed. Then the cells of a prompt's last, partial
        block are what a cold run of another prompt computes for the same tokens in its own
        partial block, and a prompt that shares part of it reuses that part (a new question
        after the same system prompt). True for Q4_0, Q4_1 and Q8_0 on llama.cpp's CPU kernels;
        false for K-quants, whose repacked kernels vary with the row count, and for a build
        whose tiled attention starts below 64 rows. Costs two prefills of 63 tokens, once."""
        import llama_cpp

        n = PREFILL_BLOCK - 1
        ids = self._probe(n)
        last = []
        for sizes in ([n], [1, n // 2 - 1, n - n // 2]):
            llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
            start = 0
            for size in sizes:
                part = ids[start : start + size]
                self._decode([(t, start + i, 0, start + i == n - 1) for i, t in enumerate(part)])
                start += size
            last.append(self._logits(sizes[-1] - 1))
        llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
        return bool((last[0] == last[1]).all())

    def has_room(self, req: Any) -> bool:
        return len(self.busy) + (self._pending is not None) < self.max_batch

    def _choose(self, ids: list[int], adapter: str | None = None) -> tuple[int, int]:
        """The free slot to use and how many prompt tokens it already holds: all of them when a
        slot holds this very prompt with its logits, else the longest shared prefix in whole
        blocks (`_reusable`) made with the same adapter, else the slot idle the longest."""
        best, shared, oldest = -1, 0, float("inf")
        for slot in self._free():
            same = self.slot_adapter[slot] == adapter
            kept = self.first_logits[slot] is not None
            if same and kept and self.held[slot][: self.logits_at[slot]] == ids:
                return slot, len(ids)
            n = common_prefix(self.held[slot][: self.prompted[slot]], ids) if same else 0
            n = self._reusable(slot, ids, n, adapter)
            if n > shared or (n == shared and self.idle_since[slot] < oldest):
                best, shared, oldest = slot, n, self.idle_since[slot]
        return best, shared

    def _reusable(self, slot: int, ids: list[int], n: int, adapter: str | None) -> int:
        """How many of the `n` tokens a slot shares with a prompt it may give (at least one is
        left to evaluate: its logits start the reply): whole blocks, which a cold run evaluates
        as the same batches; and where rows are independent (`granular`, no adapter), the part
        of the prompt's last, partial block that lies in the slot's own last partial block,
        both evaluated in batches below PREFILL_BLOCK rows."""
        n = min(n, len(ids) - 1)
        if self._as_decoded(adapter):
            return n
        partial = len(ids) // PREFILL_BLOCK * PREFILL_BLOCK  # where the prompt's last block starts
        own = self.prompted[slot] // PREFILL_BLOCK * PREFILL_BLOCK  # where the slot's starts
        if self.granular and adapter is None and n > partial and own == partial:
            return n
        return n // PREFILL_BLOCK * PREFILL_BLOCK

    def _free(self) -> list[int]:
        """Slots no request holds (neither running nor being prefilled)."""
        return [s for s in range(self.max_batch) if s not in self.busy and s != self._pending]

    def _as_decoded(self, adapter: str | None) -> bool:
        """Whether cells made with `adapter` are reused as they are, token by token, decoded ones
        included: `fast`, or exact where the model is `invariant` (the plain model: LoRA's own
        matmuls were not measured)."""
        return not self.exact or (bool(self.invariant) and adapter is None)

    def _fine(self, slot: int) -> bool:
        """Whether a slot's cells past its last whole block may be reused token by token."""
        return not self.exact or (bool(self.granular) and self.slot_adapter[slot] is None)

    def _worth(self, slot: int) -> int:
        """How many tokens a slot's cells can give a later request: what was evaluated as a
        prompt (with the reply, once made again), in whole blocks unless `_fine`; its whole
        prompt when its logits are kept."""
        n = len(self.redo[slot]) if slot in self.redo else self.prompted[slot]
        if not self._fine(slot):
            n = n // PREFILL_BLOCK * PREFILL_BLOCK
        return max(n, self.logits_at[slot] if self.first_logits[slot] is not None else 0)

    def _place(self, source: int, shared: int, ids: list[int]) -> tuple[int, bool]:
        """The free slot a request decodes in, given where its prefix lies (`source` holds
        `shared` of its prompt `ids`). llama.cpp evaluates each run of consecutive busy slots as
        a micro-batch of its own (its KV streams are viewed as one contiguous range), and a
        micro-batch costs about as much as a whole decode step: first the slot that adds no run
        (or joins two), then the one whose cache is worth the least, then `source` itself (no
        copy), then the least recently used. Taking a slot loses what it is worth (`source`:
        beyond the prefix), except where the prompt starts with all of the slot's last prompt
        (a conversation's next turn): that slot loses at most the tail of the reply the prompt
        carries on from, and is taken before an empty one. (Moving the conversation elsewhere
        would spend the caches of short prompts, worth little each, on its stale turns.)
        Returns the slot and whether the prompt carries on from it (its cache is then stale)."""

        def key(p: int) -> tuple[int, int, int, float, bool]:
            follows = self._follows(p, ids)
            loss = 0 if follows else self._worth(p) - shared if p == source else self._worth(p)
            rank = 0 if p == source and shared else 1 if follows else 2  # a source of nothing is any slot
            return (_joins(p, self.busy), loss, rank, self.idle_since[p], follows)

        keys = {p: key(p) for p in self._free()}
        slot = min(keys, key=keys.__getitem__)
        return slot, keys[slot][-1]

    def _follows(self, slot: int, ids: list[int]) -> bool:
        """Whether a prompt starts with all of the slot's last prompt (it carries on from it).
        A slot whose reply is being made again holds only part of it meanwhile: what it is to
        hold counts."""
        held = self.redo.get(slot, self.held[slot])
        return self.logits_at[slot] > 0 and common_prefix(held, ids) >= self.logits_at[slot]

    def _rank(self, slot: int) -> tuple[int, float]:
        """Least worth first, then least recently used: the order in which caches are given up."""
        return self._worth(slot), self.idle_since[slot]

    def _vacate(self, slot: int, keep: int) -> None:
        """Before the free `slot` is overwritten: its cache moves to the free slot worth the least
        (not `keep`), if that one is worth less."""
        if not self._worth(slot):
            return
        spare = [s for s in self._free() if s not in (slot, keep)]
        if spare and self._worth(low := min(spare, key=self._rank)) < self._worth(slot):
            self._copy(slot, low)

    def _compact(self) -> None:
        """Close gaps between running slots (a request in the middle of a run finished): move a
        running row into a free slot while that lowers the number of runs, each a micro-batch
        per step. A move is a stream copy (≈5 ms once); a micro-batch costs 3-8 ms every step."""
        while True:
            taken = self.busy | ({self._pending} if self._pending is not None else set())
            moves = []  # (change in the number of runs, what dst holds, src, dst)
            for src in self.busy:
                rest = taken - {src}
                left = _joins(src, rest)  # the runs that go with src
                moves += [(_joins(dst, rest) - left, self._rank(dst), src, dst) for dst in self._free()]
            best = min(moves, default=None)
            if best is None or best[0] >= 0:
                return
            _, _, src, dst = best
            self._vacate(dst, src)
            self._copy(src, dst)  # the row's cells, bit for bit: it decodes on as before
            self.rows[self.rows.index(src)] = dst
            self.busy.discard(src)
            self.busy.add(dst)
            self._empty(src)

    def _copy(self, src: int, dst: int) -> None:
        """Copy a slot's cells and what is known of them into the free slot `dst` (llama.cpp
        copies the stream's buffer before the next decode: a memcpy, where evaluating the
        tokens again costs a prefill)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.held[dst], self.prompted[dst] = list(self.held[src]), self.prompted[src]
        self.first_logits[dst], self.logits_at[dst] = self.first_logits[src], self.logits_at[src]
        self.idle_since[dst] = self.idle_since[src]
        self.slot_adapter[dst] = self.slot_adapter[src]
        self.redo.pop(dst, None)
        if src in self.redo:
            self.redo[dst] = self.redo[src]

    def _decode(self, tokens: list[tuple[int, int, int, bool]], abortable: bool = False) -> bool:
        """tokens: (token, position, sequence id, wants logits). False: aborted by the abort
        callback (`abortable`), the batch's cells removed."""
        import llama_cpp

        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        code = llama_cpp.llama_decode(self.ctx, b)
        if code == 2 and abortable:
            return False
        if code != 0:
            raise LlmhostError(f"llama.cpp could not evaluate the batch (llama_decode returned {code})")
        return True

    def _logits(self, index: int) -> Any:
        import llama_cpp
        import numpy as np
        import torch

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def prefill(self, req: Any) -> Any:
        logits = None
        while logits is None:
            logits = self.prefill_chunk(req)
        return logits

    def prefill_chunk(self, req: Any) -> Any:
        """The next PREFILL_CHUNK tokens of the prompt (in blocks of PREFILL_BLOCK, the very
        batches a cold run evaluates); the logits after the last, else None."""
        import llama_cpp

        ids = req.prompt_ids
        if self._chunking is not req:  # a new prompt: its slot, and what it can keep there
            self._retire_pending()
            if self.exact and self.granular is None:  # the first prompt: every slot is still empty
                self._measure()
            source, shared = self._choose(ids, req.adapter)
            slot, stale = self._place(source, shared, ids)
            if slot != source and not stale:
                self._vacate(slot, source)
            if slot != source and shared:
                # the request works on a copy of the prefix: `source` keeps all it holds (another
                # conversation's reply, a prompt kept for a retry)
                self._copy(source, slot)
            self.redo.pop(slot, None)
            llama_cpp.llama_memory_seq_rm(self.memory, slot, shared, -1)  # the rest of what it held
            self.held[slot] = ids[:shared]
            self.slot_adapter[slot] = req.adapter
            self._pending = slot
            req.seq.cached_tokens = shared
            if shared == len(ids):  # this very prompt, evaluated before: its logits are kept
                self.prompted[slot] = len(ids)  # the cells past it (a reply made again) are gone
                return self.first_logits[slot].clone()
            self.prompted[slot], self.first_logits[slot], self._chunking = 0, None, req
        slot = self._pending
        assert slot is not None
        self._apply(req.adapter)  # decode steps in between may have applied another
        begin = len(self.held[slot])
        end = min(len(ids), begin + PREFILL_CHUNK)
        for start in range(begin, end, PREFILL_BLOCK):
            part = ids[start : min(start + PREFILL_BLOCK, end)]
            last = start + len(part) == len(ids)
            self._decode([(t, start + i, slot, last and i == len(part) - 1) for i, t in enumerate(part)])
            self.held[slot] = self.held[slot] + part
        if end < len(ids):
            return None
        self.prompted[slot], self._chunking = len(ids), None
        logits = self._logits(len(part) - 1)
        self.first_logits[slot] = logits.clone()  # the sampler's processors may write to `logits`
        self.logits_at[slot] = len(ids)
        return logits

    def idle_work(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Evaluate one block of a finished reply again, as a prompt block, while no request
        runs; True while more remain. A reply's cells were made one decode step at a time, which
        is not how a cold run evaluates them (see the class notes), so they cannot be reused as
        they are; made again in whole blocks, the conversation's next turn reuses them and
        prefills only its new message. Where rows are independent (`_fine`), the last, partial
        block is evaluated again too, as a cold run evaluates a prompt that ends in it. The
        scheduler calls this only when it is idle; a request
        that arrives meanwhile (`interrupt()` turns true) aborts the block within a graph node
        (llama.cpp removes the block's cells), and the block is evaluated at the next idle time."""
        import llama_cpp

        if not self.redo:
            return False
        slot, tokens = next(iter(self.redo.items()))
        fine = self._fine(slot)
        whole = len(tokens) // PREFILL_BLOCK * PREFILL_BLOCK  # where the last, partial block starts
        if len(self.held[slot]) != self.prompted[slot]:  # first block: drop the decoded cells
            start = self.prompted[slot]
            if not (fine and start >= whole):  # a block that ends up whole is evaluated whole
                start = start // PREFILL_BLOCK * PREFILL_BLOCK
            llama_cpp.llama_memory_seq_rm(self.memory, slot, start, -1)
            self.held[slot], self.prompted[slot] = tokens[:start], start
            if self.logits_at[slot] > start:
                self.first_logits[slot] = None
        self._apply(self.slot_adapter[slot])
        start = len(self.held[slot])
        # whole blocks, then (`fine`) the last partial one, as a cold run of the next turn
        # evaluates it when that turn's prompt ends in the same block
        block = tokens[start : start + PREFILL_BLOCK] if start < whole else tokens[start:]
        # polled by llama.cpp's compute thread between graph nodes, only while this block runs
        callback = llama_cpp.ggml_abort_callback(lambda _: bool(interrupt and interrupt()))
        llama_cpp.llama_set_abort_callback(self.ctx, callback, None)
        try:
            done = self._decode([(t, start + i, slot, False) for i, t in enumerate(block)], abortable=True)
        except LlmhostError:
            del self.redo[slot]
            self.prompted[slot] = 0  # nothing reused from a slot whose work failed
            raise
        finally:
            llama_cpp.llama_set_abort_callback(self.ctx, llama_cpp.ggml_abort_callback(), None)
        if not done:
            return True
        self.held[slot] = self.held[slot] + block
        self.prompted[slot] = len(self.held[slot])
        if len(self.held[slot]) == len(tokens) or (len(self.held[slot]) == whole and not fine):
            del self.redo[slot]
        return bool(self.redo)

    def abort_prefill(self) -> None:
        """Give up the prompt being prefilled (its request was cancelled)."""
        self._chunking = None
        self._retire_pending()

    def commit_prefill(self) -> None:
        assert self._pending is not None
        self.rows.append(self._pending)
        self.busy.add(self._pending)
        self._pending = None

    def step(self, reqs: list[Any]) -> Any:
        import torch

        groups: dict[str | None, list[int]] = {}
        for row, req in enumerate(reqs):
            groups.setdefault(req.adapter, []).append(row)
        logits: list[Any] = [None] * len(reqs)
        # the current adapter's rows first: one switch fewer per step
        for adapter in sorted(groups, key=lambda a: a != self._applied):
            # in slot order: llama.cpp splits a batch whose sequence ids do not ascend into
            # several micro-batches (rows in reverse order: one each, 2x the time for 8 rows)
            rows = sorted(groups[adapter], key=lambda r: self.rows[r])
            self._apply(adapter)
            tokens = [(reqs[r].last_token, len(self.held[self.rows[r]]), self.rows[r], True) for r in rows]
            self._decode(tokens)
            for i, (row, (token, _, slot, _)) in enumerate(zip(rows, tokens, strict=True)):
                self.held[slot].append(token)
                logits[row] = self._logits(i)
        return torch.stack(logits)

    def _apply(self, adapter: str | None) -> None:
        """Make `adapter` (None: the plain model) the context's one LoRA adapter."""
        import ctypes

        import llama_cpp

        if adapter == self._applied:
            return
        if adapter is None:
            code = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            code = llama_cpp.llama_set_adapters_lora(self.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise LlmhostError(f"llama.cpp could not switch LoRA adapters (code {code})")
        self._applied = adapter

    def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Load a peft LoRA adapter, converted to llama.cpp's GGUF form once (inference thread)."""
        import llama_cpp

        from llmhost.config import llmhost_home
        from llmhost.engine.backends.gguf import lora_gguf

        meta = self.llm.metadata
        arch = meta.get("general.architecture", "")
        heads = int(meta.get(f"{arch}.attention.head_count", 0) or 0)
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads)
        file = lora_gguf(path, llmhost_home() / "converted", arch, heads, kv_heads)
        pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(file).encode())
        if not pointer:
            raise LlmhostError(f"llama.cpp could not load the adapter {path} (converted: {file})")
        self.adapters[adapter_id] = pointer

    def remove_adapter(self, adapter_id: str) -> None:
        import llama_cpp

        if adapter_id not in self.adapters:
            return
        if self._applied == adapter_id:
            self._apply(None)
        for slot in range(self.max_batch):  # its cached prompts go with it
            if self.slot_adapter[slot] == adapter_id and slot not in self.busy:
                self._empty(slot)
                self.slot_adapter[slot] = None
        llama_cpp.llama_adapter_lora_free(self.adapters.pop(adapter_id))

    def drop(self, keep: list[int]) -> None:
        if self._chunking is None:  # a prompt half prefilled stays (decode steps come between)
            self._retire_pending()
        kept = set(keep)
        for i, slot in enumerate(self.rows):
            if i not in kept:
                self._release(slot)
        self.rows = [self.rows[i] for i in keep]
        self._compact()

    def _release(self, slot: int) -> None:
        """A finished request's slot: free for the next, its cells kept as a prompt cache."""
        import time

        self.busy.discard(slot)
        self.idle_since[slot] = time.monotonic()
        held, prompted = self.held[slot], self.prompted[slot]
        if self._as_decoded(self.slot_adapter[slot]):  # the decoded cells are reused as they are
            self.prompted[slot] = len(held)
            return
        gained = len(held) // PREFILL_BLOCK > prompted // PREFILL_BLOCK  # a whole block
        if gained or (self._fine(slot) and len(held) > prompted):  # or, `fine`, any token
            self.redo[slot] = held

    def _retire_pending(self) -> None:
        """A prefilled request that was not committed (it finished on its first token, or its
        prefill failed: then nothing it held is trusted)."""
        if self._pending is not None:
            slot, self._pending = self._pending, None
            if self.prompted[slot] == 0:  # the prefill did not complete
                self.held[slot] = []
            self._release(slot)

    def forget(self) -> None:
        """Empty every free slot's prompt cache (the next requests start cold)."""
        if self._chunking is None:  # a request that ended on its first token holds no slot
            self._retire_pending()
        for slot in self._free():
            self._empty(slot)

    def _empty(self, slot: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.held[slot], self.prompted[slot], self.first_logits[slot], self.logits_at[slot] = [], 0, None, 0
        self.redo.pop(slot, None)

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


def _joins(slot: int, taken: set[int]) -> int:
    """How the number of runs of consecutive slots in `taken` changes once `slot` is taken too:
    1 (a run of its own), 0 (it extends one), -1 (it joins two)."""
    return 1 - (slot - 1 in taken) - (slot + 1 in taken)


def _controls(llm: Any, template: str | None) -> list[str]:
    """The vocabulary's control tokens, and its user-defined ones that the template writes."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    special, added = [], []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
            text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
            (special if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL else added).append(text)
    return control_tokens(special, added, template)


def load(ref: ModelRef, settings: LoadSettings) -> LlamaCppEngine:
    """The GGUF file itself, read by llama.cpp (no conversion)."""
    try:
        return LlamaCppEngine.load(ref.gguf_file(), settings, ref.name)
    except GGUFReadError as err:
        raise ref.damaged(ref.path, str(err), "GGUF model") from None


class LlamaCppEngine(LocalEngine):
    kind = "llamacpp"
    serves_adapters = True

    def __init__(self, llm: Any, name: str, template: str | None, settings: LoadSettings) -> None:
        import llama_cpp

        self.llm = llm
        self.name = name
        window = settings.context_length or llama_cpp.llama_model_n_ctx_train(llm.model)
        self.max_batch = settings.max_concurrency
        #: Each slot's KV stream, and so the most one request may span.
        self.context_length = slot_tokens(
            llm, window, settings.context_length is not None, settings.kv_cache_gib, self.max_batch
        )
        log.info(
            "llama.cpp: %d slots (--max-concurrency) of %d tokens each (the model's window is %d), a KV "
            "cache of %.2f GiB (--kv-cache-gib, --context-length)",
            self.max_batch,
            self.context_length,
            window,
            self.max_batch * self.context_length * kv_bytes_per_token(llm) / 2**30,
        )
        self.decoder = _Decoder(llm)
        self.max_queue = settings.max_queue
        self.exact = settings.exact_prefix
        #: Whether the exact prefix cache tries ggml's reference kernels (`LlamaCppRunner`); off, it
        #: gets the scheme K-quants get
        self.reference_kernels = settings.reference_kernels
        meta = llm.metadata
        eos = {llm.token_eos()}
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in meta:
                eos.add(int(meta[key]))
        self.eos_ids = eos
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        self.template = ChatTemplate(
            template, name, {"bos_token": bos, "eos_token": eos}, _controls(llm, template)
        )

    @classmethod
    def load(cls, gguf: Path, settings: LoadSettings, name: str) -> LlamaCppEngine:
        if not available():
            raise LlmhostError(f"the llama.cpp engine is not installed: {INSTALL}")
        # this object reads the model, its tokenizer and metadata; decoding happens in the
        # runner's own multi-sequence context, so its own context is kept minimal
        repack = ggml_repack.decide(settings.weight_repack, gguf)
        try:
            llm = ggml_repack.open_model(gguf, bool(repack.use))
        except ValueError as err:  # llama.cpp says only "Failed to load model from file"
            check_readable(gguf)  # a damaged file is GGUFReadError, which the caller words
            raise LlmhostError(
                f"llama.cpp could not load {gguf} ({err}); the file reads fine, so its architecture may be "
                "newer than this llama.cpp: upgrade llama-cpp-python, or try --engine transformers"
            ) from None
        template = settings.read_chat_template() or llm.metadata.get("tokenizer.chat_template")
        engine = cls(llm, name, template, settings)
        _ = engine.scheduler  # the KV cache now: not enough memory is a load error, not a request's
        return engine

    def encode_markup(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def encode_text(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def grammar_tokenizer(self) -> Any:
        from llmhost.engine.grammar import load_llguidance

        load_llguidance()
        import llama_cpp
        import llguidance.llamacpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=sorted(self.eos_ids))

    def runner(self) -> LlamaCppRunner:
        cores = physical_cores()
        return LlamaCppRunner(
            self.llm, self.context_length, self.max_batch, cores, self.exact, self.reference_kernels
        )
