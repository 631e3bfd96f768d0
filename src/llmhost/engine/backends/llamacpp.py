"""`--engine llamacpp` (`pip install llmhost[llamacpp]`): a GGUF file run by llama-cpp-python on
the CPU, with llama.cpp's quantized kernels and none of the conversion to float32.

It plugs into the same scheduler as the transformers engine: llama.cpp evaluates tokens and
hands back logits; llmhost's own sampling, stop strings, UTF-8-safe detokenization, queue and
cancellation run on top, so both engines behave alike for every front end. Concurrent requests
are decoded together with llama.cpp's multi-sequence batching, up to --max-concurrency and as
many as the KV cache (--kv-cache-gib) holds at their longest; the rest wait in the queue
(llmhost_queue_length in /metrics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.backends.gguf import GGUFReadError, check_readable
from llmhost.engine.local import LocalEngine
from llmhost.engine.ref import ModelRef
from llmhost.engine.template import ChatTemplate, control_tokens
from llmhost.errors import LlmhostError

log = logging.getLogger("llmhost.llamacpp")

INSTALL = "pip install 'llmhost[llamacpp]' (builds llama-cpp-python from source, about 7 minutes on 2 cores)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


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


def kv_capacity(llm: Any, window: int, kv_gib: float | None, most: int) -> int:
    """Tokens the shared KV cache holds. By default one full window, the memory llama.cpp alone
    would take (typical requests of a few hundred tokens still run many at a time); with
    `kv_gib`, what that buys, but at least one window and at most `most` full windows."""
    if kv_gib is None:
        return window
    return max(window, min(int(kv_gib * 2**30 // kv_bytes_per_token(llm)), window * most))


class LlamaCppRunner:
    """Many sequences per llama.cpp decode call (its multi-sequence batching): each running
    request owns a sequence id in one KV cache of `capacity` tokens that they share.

    Two findings about llama.cpp shape this (both checked by tests/test_llamacpp.py):
    - without flash attention, a shared cache gave a request logits off by up to ~26 whenever
      other sequences sat in it at other positions; with it they are bit-identical;
    - removing a finished sequence (`llama_memory_seq_rm`) while others still decode shifted
      their logits by up to 1.5. Root cause (measured with this llama.cpp): llama.cpp puts the
      next tokens into the lowest free cells, so a running sequence's cells stop being in
      position order, and the CPU flash-attention kernel's sums depend on where a sequence's
      cells lie: prompts are evaluated in 64-cell tiles (the same prompt at a cell offset that
      is not a multiple of 64 differs by up to 0.7), and a decode step splits the cache's cells
      between the threads and adds their partial sums (a sequence whose cells straddle the
      split differs by up to 1.1). With `kv_unified` off (one stream per sequence) removal is
      exact, but every sequence then gets only capacity / sequences cells. So finished
      sequences are retired, not removed: their cells stay until no request runs, and then the
      cache is cleared at once. (Which is also why a shared-prefix cache is not built on this
      unified cache: its replies would not equal a cold run's.)
    Requests are admitted while the cache can hold them at their longest (prompt + max tokens)
    and a sequence id is free; the others wait, and all run again after the next clear.

    The low-level API is used because the binding's `Llama` class decodes one sequence only; that
    object is kept for the model, its tokenizer and metadata.
    """

    device = "cpu"

    def __init__(self, llm: Any, window: int, capacity: int, max_batch: int, threads: int) -> None:
        import llama_cpp

        self.max_batch = max_batch
        self.capacity = capacity
        self.n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # the binding's defaults
        params.n_ctx = capacity
        params.n_batch = params.n_ubatch = min(window, 512)
        # ids for the running requests and for those retired since the last clear
        params.n_seq_max = min(llama_cpp.llama_max_parallel_sequences(), max_batch * 4)
        params.kv_unified = True  # one cache: a request may use its whole window while others are short
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = threads
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp's context chatter, as the binding does
            self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise LlmhostError(
                f"llama.cpp could not create a KV cache of {capacity} tokens (out of memory?): "
                "lower --kv-cache-gib or --context-length"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.chunk = params.n_batch
        self.batch = llama_cpp.llama_batch_init(max(self.chunk, max_batch), 0, 1)
        self.n_seq = params.n_seq_max
        self.free = list(range(self.n_seq))
        self.rows: list[int] = []  # the sequence id of each running row, in the scheduler's order
        self.length: dict[int, int] = {}  # tokens in the KV cache per sequence id
        self.reserved: dict[int, int] = {}  # tokens each running sequence may grow to
        self.retired = 0  # cells held by sequences that finished since the last clear
        self._pending: int | None = None

    def has_room(self, req: Any) -> bool:
        used = sum(self.reserved.values()) + self.retired
        return bool(self.free) and used + _longest(req) <= self.capacity

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """tokens: (token, position, sequence id, wants logits)."""
        import llama_cpp

        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if (code := llama_cpp.llama_decode(self.ctx, b)) != 0:
            raise LlmhostError(f"llama.cpp could not evaluate the batch (llama_decode returned {code})")

    def _logits(self, index: int) -> Any:
        import llama_cpp
        import numpy as np
        import torch

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def prefill(self, req: Any) -> Any:
        self._retire_pending()
        seq = self.free.pop()
        ids = req.prompt_ids
        self.length[seq], self.reserved[seq] = 0, _longest(req)
        try:
            for start in range(0, len(ids), self.chunk):
                part = ids[start : start + self.chunk]
                last = start + len(part) == len(ids)
                self._decode([(t, start + i, seq, last and i == len(part) - 1) for i, t in enumerate(part)])
                self.length[seq] = start + len(part)
        except BaseException:
            self._retire(seq)
            self._clear_if_idle()
            raise
        self._pending = seq
        return self._logits(len(part) - 1)

    def commit_prefill(self) -> None:
        assert self._pending is not None
        self.rows.append(self._pending)
        self._pending = None

    def step(self, reqs: list[Any]) -> Any:
        import torch

        tokens = [(r.last_token, self.length[seq], seq, True) for r, seq in zip(reqs, self.rows, strict=True)]
        self._decode(tokens)
        for seq in self.rows:
            self.length[seq] += 1
        return torch.stack([self._logits(i) for i in range(len(tokens))])

    def drop(self, keep: list[int]) -> None:
        self._retire_pending()
        kept = set(keep)
        for i, seq in enumerate(self.rows):
            if i not in kept:
                self._retire(seq)
        self.rows = [self.rows[i] for i in keep]
        self._clear_if_idle()

    def _retire_pending(self) -> None:
        """A prefilled request that was not committed (it finished on its first token)."""
        if self._pending is not None:
            self._retire(self._pending)
            self._pending = None

    def _retire(self, seq: int) -> None:
        self.reserved.pop(seq, None)
        self.retired += self.length.pop(seq, 0)

    def _clear_if_idle(self) -> None:
        import llama_cpp

        if not self.rows and self._pending is None and len(self.free) < self.n_seq:
            llama_cpp.llama_memory_clear(self.memory, True)
            self.free, self.retired = list(range(self.n_seq)), 0

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


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


def _longest(req: Any) -> int:
    return len(req.prompt_ids) + req.seq.params.max_new_tokens


def load(ref: ModelRef, settings: LoadSettings) -> LlamaCppEngine:
    """The GGUF file itself, read by llama.cpp (no conversion)."""
    try:
        return LlamaCppEngine.load(ref.gguf_file(), settings, ref.name)
    except GGUFReadError as err:
        raise ref.damaged(ref.path, str(err), "GGUF model") from None


class LlamaCppEngine(LocalEngine):
    kind = "llamacpp"

    def __init__(self, llm: Any, name: str, template: str | None, settings: LoadSettings) -> None:
        import llama_cpp

        self.llm = llm
        self.name = name
        self.context_length = settings.context_length or llama_cpp.llama_model_n_ctx_train(llm.model)
        self.max_batch = settings.max_concurrency
        self.kv_tokens = kv_capacity(llm, self.context_length, settings.kv_cache_gib, self.max_batch)
        log.info(
            "llama.cpp: a KV cache of %d tokens (%.2f GiB, see --kv-cache-gib) for up to %d requests "
            "at a time of up to %d tokens each",
            self.kv_tokens,
            self.kv_tokens * kv_bytes_per_token(llm) / 2**30,
            self.max_batch,
            self.context_length,
        )
        self.decoder = _Decoder(llm)
        self.max_queue = settings.max_queue
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
        from llama_cpp import Llama

        # this object reads the model, its tokenizer and metadata; decoding happens in the
        # runner's own multi-sequence context, so its own context is kept minimal
        try:
            llm = Llama(model_path=str(gguf), n_ctx=64, n_batch=64, n_threads=physical_cores(), verbose=False)
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
        return LlamaCppRunner(self.llm, self.context_length, self.kv_tokens, self.max_batch, physical_cores())
