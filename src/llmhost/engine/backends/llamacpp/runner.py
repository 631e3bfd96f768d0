"""The llama.cpp runner: many sequences per decode call, one slot each (`slots.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llmhost.engine.backends.llamacpp.kernels as kernels
import llmhost.engine.backends.llamacpp.measure as measure
from llmhost.engine.backends.llamacpp.offload import KV_TYPES
from llmhost.engine.backends.llamacpp.slots import (
    PREFILL_BLOCK,
    Reuse,
    Slot,
    choose,
    compaction,
    free_slots,
    next_redo,
    place,
    spare_for,
    whole_blocks,
)
from llmhost.engine.speculation import BatchCost
from llmhost.errors import LlmhostError

log = logging.getLogger("llmhost.llamacpp")

#: A long prompt is prefilled this many tokens at a time, with a decode step of the running
#: requests in between (≈0.35 s of the embedded model's prefill on 2 cores): they pause for a
#: chunk, not for the whole prompt.
PREFILL_CHUNK = 2 * PREFILL_BLOCK


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
      step's KV cells between the threads (`kernels.py`). Its reference kernels compute every
      position alike in any batch for most quantizations, measured at the first prefill
      (`invariant`): then a slot's cells are reused as they are, token by token, a reply's
      decoded cells included, and a next turn sent at once prefills only its new message.
      Where they do not (K-quants' repacked matmuls vary with the row count), prompts are
      evaluated in blocks of PREFILL_BLOCK positions, only whole blocks are reused (every block
      is the very batch a cold run evaluates), and a reply is evaluated again as prompt blocks
      while the engine is idle (`idle_work`).

    With `exact` off (`--prefix-cache fast`) the default kernels stay and a reply's decoded cells
    are reused as they are, as llama-server does. The low-level API is used because the binding's
    `Llama` class decodes one sequence only (that object keeps the model, tokenizer, metadata).
    """

    device = "cpu"
    #: torch only samples here, row by row: its intra-op threads' OpenMP workers would spin after
    #: each op on the cores llama.cpp's threads need (3-8% of single-stream decode speed)
    torch_threads = 1

    def __init__(
        self,
        llm: Any,
        slot_tokens: int,
        slots: int,
        threads: int,
        exact: bool = True,
        reference: bool = True,
        kv_cache: str = "f16",
        draft: Any = None,
    ) -> None:
        import llama_cpp

        self.max_batch = slots
        self.slot_tokens = slot_tokens
        self.n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # the binding's defaults
        params.n_ctx = slot_tokens * slots
        params.n_batch = params.n_ubatch = max(PREFILL_BLOCK, slots)
        params.n_seq_max = slots
        params.kv_unified = False  # a stream per slot (above); --kv-cache's type, flash attention for it
        params.type_k = params.type_v = KV_TYPES[kv_cache]
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = threads
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp's context chatter, as the binding does
            self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise LlmhostError(
                f"llama.cpp could not make a {kv_cache} KV cache of {slots} × {slot_tokens} tokens (out of "
                "memory?): lower --kv-cache-gib, --context-length or --max-concurrency; try --kv-cache q8_0"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.llm = llm
        self.slots = [Slot(i) for i in range(slots)]
        #: The slot of each running row, in the scheduler's order.
        self.rows: list[Slot] = []
        self._admitted: Slot | None = None  # prefilling, or prefilled and not yet committed
        self._chunking: Any = None  # the request whose prompt is being prefilled, chunk by chunk
        #: What cells may be reused; `invariant` and `granular` are measured at the first prefill (the
        #: warm-up), on the thread that decodes (one from this constructor's left later ones slower).
        self.reuse = Reuse(exact)
        #: LoRA adapters by id. llama.cpp applies adapters to a whole context, not per sequence,
        #: so each decode call evaluates the rows of one adapter (`step` groups them).
        self.adapters: dict[str, Any] = {}
        self._applied: str | None = None
        #: The context's CPU backends, whose reference kernels `exact` tries (`reference` off:
        #: the block scheme K-quants get).
        self.backends = kernels.cpu_backends(self.ctx) if exact and reference else []
        #: What a pass over n positions costs here (speculation's rule), measured at the first prefill.
        self.batch_cost: BatchCost | None = None
        self.max_positions = params.n_batch
        #: The draft model (`--speculative draft`, draft.py), a KV stream per slot; None without one.
        self.draft = draft

    # -- views for tests and logs ------------------------------------------------------------
    @property
    def running(self) -> list[int]:
        """The running slots' ids, ascending."""
        return [s.id for s in self.slots if s.state == "running"]

    @property
    def redo(self) -> dict[int, list[int]]:
        """Free slots whose reply is to be made again while idle: what each is to hold."""
        return {s.id: s.redo for s in self.slots if s.redo is not None}

    def has_room(self, req: Any) -> bool:
        return sum(not s.free for s in self.slots) < self.max_batch

    def _copy(self, src: Slot, dst: Slot) -> None:
        """Copy a slot's cells and what is known of them into the free slot `dst` (llama.cpp
        copies the stream's buffer before the next decode: a memcpy, where evaluating the
        tokens again costs a prefill)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(self.memory, src.id, dst.id, -1, -1)
        dst.take(src)

    def _vacate(self, slot: Slot, keep: Slot) -> None:
        """Before the free `slot` is overwritten: its cache moves to a free slot worth less."""
        if (spare := spare_for(self.slots, slot, keep, self.reuse)) is not None:
            self._copy(slot, spare)

    def _compact(self) -> None:
        """Close gaps between running slots (a request in the middle of a run finished)."""
        while (move := compaction(self.slots, self.reuse)) is not None:
            src, dst = move
            self._vacate(dst, src)
            self._copy(src, dst)  # the row's cells, bit for bit: it decodes on as before
            self.rows[self.rows.index(src)] = dst
            src.state, dst.state = "free", "running"
            self._empty(src)

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
        ids = req.prompt_ids
        if self._chunking is not req:  # a new prompt: its slot, and what it can keep there
            first = self._admit(req)
            if first is not None:
                return first
        slot = self._admitted
        assert slot is not None
        self._apply(req.adapter)  # decode steps in between may have applied another
        begin = len(slot.tokens)
        end = min(len(ids), begin + PREFILL_CHUNK)
        for start in range(begin, end, PREFILL_BLOCK):
            part = ids[start : min(start + PREFILL_BLOCK, end)]
            last = start + len(part) == len(ids)
            self._decode([(t, start + i, slot.id, last and i == len(part) - 1) for i, t in enumerate(part)])
            slot.tokens = slot.tokens + part
        if end < len(ids):
            return None
        slot.prompted, self._chunking = len(ids), None
        logits = self._logits(len(part) - 1)
        slot.first_logits = logits.clone()  # the sampler's processors may write to `logits`
        slot.prompt_len = len(ids)
        return logits

    def _admit(self, req: Any) -> Any:
        """A new prompt's slot, holding what it may reuse; the kept logits when the slot holds
        this very prompt already (nothing to evaluate), else None."""
        import llama_cpp

        ids = req.prompt_ids
        self._retire_admitted()
        if self.batch_cost is None:  # the first prompt: every slot is empty
            if self.reuse.exact:
                measure.exactness(self)
            self.batch_cost = measure.batch_cost(self)
        source, shared = choose(self.slots, ids, req.adapter, self.reuse)
        slot, stale = place(self.slots, source, shared, ids, self.reuse)
        if slot is not source and not stale:
            self._vacate(slot, source)
        if slot is not source and shared:
            # the request works on a copy of the prefix: `source` keeps all it holds (another
            # conversation's reply, a prompt kept for a retry)
            self._copy(source, slot)
        slot.redo = None
        llama_cpp.llama_memory_seq_rm(self.memory, slot.id, shared, -1)  # the rest of what it held
        slot.tokens, slot.adapter, slot.state = ids[:shared], req.adapter, "prefilling"
        self._admitted = slot
        req.seq.cached_tokens = shared
        if shared == len(ids):  # this very prompt, evaluated before: its logits are kept
            slot.prompted = len(ids)  # the cells past it (a reply made again) are gone
            return slot.first_logits.clone()
        slot.prompted, slot.first_logits, self._chunking = 0, None, req
        return None

    def idle_work(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Evaluate one block of a finished reply again, as a prompt block, while no request
        runs; True while more remain. A reply's cells were made one decode step at a time, which
        is not how a cold run evaluates them (see the class notes), so they cannot be reused as
        they are; made again in whole blocks, the conversation's next turn reuses them and
        prefills only its new message. Where rows are independent (`Reuse.partial_blocks`), the
        last, partial block is evaluated again too, as a cold run evaluates a prompt that ends
        in it. The scheduler calls this only when it is idle; a request that arrives meanwhile
        (`interrupt()` turns true) aborts the block within a graph node (llama.cpp removes the
        block's cells), and the block is evaluated at the next idle time."""
        import llama_cpp

        slot = next_redo(self.slots)
        if slot is None:
            return False
        tokens = slot.redo
        assert tokens is not None
        partial = self.reuse.partial_blocks(slot)
        whole = whole_blocks(len(tokens))  # where the last, partial block starts
        if len(slot.tokens) != slot.prompted:  # first block: drop the decoded cells
            start = slot.prompted
            if not (partial and start >= whole):  # a block that ends up whole is evaluated whole
                start = whole_blocks(start)
            llama_cpp.llama_memory_seq_rm(self.memory, slot.id, start, -1)
            slot.tokens, slot.prompted = tokens[:start], start
            if slot.prompt_len > start:
                slot.first_logits = None
        self._apply(slot.adapter)
        start = len(slot.tokens)
        # whole blocks, then (`partial`) the last partial one, as a cold run of the next turn
        # evaluates it when that turn's prompt ends in the same block
        block = tokens[start : start + PREFILL_BLOCK] if start < whole else tokens[start:]
        # polled by llama.cpp's compute thread between graph nodes, only while this block runs
        callback = llama_cpp.ggml_abort_callback(lambda _: bool(interrupt and interrupt()))
        llama_cpp.llama_set_abort_callback(self.ctx, callback, None)
        try:
            done = self._decode([(t, start + i, slot.id, False) for i, t in enumerate(block)], abortable=True)
        except LlmhostError:
            slot.redo, slot.prompted = None, 0  # nothing reused from a slot whose work failed
            raise
        finally:
            llama_cpp.llama_set_abort_callback(self.ctx, llama_cpp.ggml_abort_callback(), None)
        if not done:
            return True
        slot.tokens = slot.tokens + block
        slot.prompted = len(slot.tokens)
        if len(slot.tokens) == len(tokens) or (len(slot.tokens) == whole and not partial):
            slot.redo = None
        return next_redo(self.slots) is not None

    def abort_prefill(self) -> None:
        """Give up the prompt being prefilled (its request was cancelled)."""
        self._chunking = None
        self._retire_admitted()

    def commit_prefill(self) -> None:
        slot = self._admitted
        assert slot is not None
        slot.state, self._admitted = "running", None
        self.rows.append(slot)

    def step(self, reqs: list[Any]) -> Any:
        import torch

        return torch.stack([rows[0] for rows in self.verify(reqs, [[] for _ in reqs])])

    @property
    def verifies_exactly(self) -> bool:
        """Whether a position computes alike in a verify batch and in a decode step (the
        reference kernels, measured): greedy replies are the same tokens with speculation."""
        return bool(self.reuse.exact and self.reuse.invariant)

    def verify(self, reqs: list[Any], drafts: list[list[int]]) -> list[Any]:
        """One pass over each row's last token and its proposal (`drafts`, empty: a plain decode
        step); per row, the logits of each of those positions ([1 + len(draft), vocab])."""
        import torch

        groups: dict[str | None, list[int]] = {}
        for row, req in enumerate(reqs):
            groups.setdefault(req.adapter, []).append(row)
        logits: list[Any] = [None] * len(reqs)
        # the current adapter's rows first: one switch fewer per step
        for adapter in sorted(groups, key=lambda a: a != self._applied):
            # in slot order: llama.cpp splits a batch whose sequence ids do not ascend into
            # several micro-batches (rows in reverse order: one each, 2x the time for 8 rows)
            rows = sorted(groups[adapter], key=lambda r: self.rows[r].id)
            batch, spans = [], []
            for row in rows:
                slot, tokens = self.rows[row], [reqs[row].last_token, *drafts[row]]
                spans.append((row, len(batch), len(tokens)))
                batch += [(t, len(slot.tokens) + i, slot.id, True) for i, t in enumerate(tokens)]
                slot.tokens.extend(tokens)
            self._apply(adapter)
            self._decode(batch)
            for row, start, n in spans:
                logits[row] = torch.stack([self._logits(start + i) for i in range(n)])
        return logits

    def draft_for(self, rows: list[tuple[int, Any, int]]) -> list[list[int]]:
        """The draft model's proposals: for each (row, its request, k), k tokens."""
        assert self.draft is not None
        return self.draft.propose(
            [(self.rows[r].id, [*self.rows[r].tokens, req.last_token], k) for r, req, k in rows]
        )

    def rollback(self, row: int, n: int) -> None:
        """Drop a row's last `n` cells (proposed tokens that were not sampled)."""
        import llama_cpp

        if n:
            slot = self.rows[row]
            cut = len(slot.tokens) - n
            llama_cpp.llama_memory_seq_rm(self.memory, slot.id, cut, -1)
            slot.tokens = slot.tokens[:cut]

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
        for slot in self.slots:  # its cached prompts go with it
            if slot.adapter == adapter_id and slot.state != "running":
                self._empty(slot)
                slot.adapter = None
        llama_cpp.llama_adapter_lora_free(self.adapters.pop(adapter_id))

    def drop(self, keep: list[int]) -> None:
        if self._chunking is None:  # a prompt half prefilled stays (decode steps come between)
            self._retire_admitted()
        kept = set(keep)
        for i, slot in enumerate(self.rows):
            if i not in kept:
                self._release(slot)
        self.rows = [self.rows[i] for i in keep]
        self._compact()

    def _release(self, slot: Slot) -> None:
        """A finished request's slot: free for the next, its cells kept as a prompt cache."""
        slot.state, slot.idle_since = "free", time.monotonic()
        if self.reuse.as_decoded(slot.adapter):  # the decoded cells are reused as they are
            slot.prompted = len(slot.tokens)
            return
        gained = len(slot.tokens) // PREFILL_BLOCK > slot.prompted // PREFILL_BLOCK  # a whole block
        if gained or (self.reuse.partial_blocks(slot) and len(slot.tokens) > slot.prompted):  # or any token
            slot.redo = slot.tokens

    def _retire_admitted(self) -> None:
        """A prefilled request that was not committed (it finished on its first token, or its
        prefill failed: then nothing it held is trusted)."""
        if self._admitted is not None:
            slot, self._admitted = self._admitted, None
            if slot.prompted == 0:  # the prefill did not complete
                slot.tokens = []
            self._release(slot)

    def forget(self) -> None:
        """Empty every free slot's prompt cache (the next requests start cold)."""
        if self._chunking is None:  # a request that ended on its first token holds no slot
            self._retire_admitted()
        for slot in free_slots(self.slots):
            self._empty(slot)

    def _empty(self, slot: Slot) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
        slot.empty()

    def close(self) -> None:
        import llama_cpp

        if self.draft is not None:
            self.draft.close()
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
