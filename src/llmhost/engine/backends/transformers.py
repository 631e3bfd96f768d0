"""`--engine transformers`: a Hugging Face folder on CPU or GPU, one decode loop for every caller."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llmhost.engine.backends.hf_kvcache as hf_kvcache  # the backend's own: imports transformers
import llmhost.engine.backends.hf_verify as hf_verify
from llmhost.config import LoadSettings
from llmhost.engine.backends.hf_folder import (
    batchable,
    cache_kwarg,
    context_length_of,
    eos_ids,
    load_errors,
    read_config,
    successor_hint,
)
from llmhost.engine.base import Engine
from llmhost.engine.embedding import EmbeddingEngine, read_spec
from llmhost.engine.local import LocalEngine
from llmhost.engine.ref import ModelRef
from llmhost.engine.rerank import RerankEngine, read_rerank_spec
from llmhost.engine.template import ChatTemplate, control_tokens
from llmhost.errors import LlmhostError


def load(ref: ModelRef, settings: LoadSettings) -> Engine:
    """A Hugging Face folder (GGUF models converted once); an adapter is merged into its base; a
    sentence-transformers folder is an embedding model, a cross-encoder (or a model declared
    one) a reranker."""
    if not ref.is_adapter and not ref.is_gguf:
        if (spec := read_spec(ref.path, ref.matryoshka)) is not None:
            return EmbeddingEngine.load(ref.path, spec, settings, ref.name)
        if (scoring := read_rerank_spec(ref.path, ref.declared_task)) is not None:
            return RerankEngine.load(ref.path, scoring, settings, ref.name)
        _refuse_bare_encoder(ref)
    if ref.is_adapter:
        assert ref.base is not None
        return TransformersEngine.load(ref.base.hf_folder(), settings, ref.name, adapter=ref.path, ref=ref)
    return TransformersEngine.load(ref.hf_folder(), settings, ref.name, ref=ref)


def _refuse_bare_encoder(ref: ModelRef) -> None:
    """A base model without a head (BertModel, XLMRobertaModel, Qwen3Model) and without the
    sentence-transformers files that say how to pool it: its vectors would be a guess."""
    architectures = [str(a) for a in read_config(ref.path).get("architectures") or []]
    if architectures and all(a.endswith("Model") and "LMHead" not in a for a in architectures):
        raise LlmhostError(
            f"{ref.name} is a {architectures[0]} without a language-model head and without "
            "sentence-transformers files (modules.json, 1_Pooling/config.json) that say how to pool it; "
            "llmhost does not guess: use the model's sentence-transformers version, or save it with "
            "sentence-transformers (SentenceTransformer(...).save(folder))"
        )


def chat_template_of(tokenizer: Any, name: str, override: str | None = None) -> ChatTemplate:
    """The template a transformers tokenizer carries (or `override`), with its control tokens."""
    source = override or getattr(tokenizer, "chat_template", None)
    added = tokenizer.added_tokens_decoder.values()
    controls = control_tokens(
        [t.content for t in added if t.special], [t.content for t in added if not t.special], source
    )
    return ChatTemplate(source, name, tokenizer.special_tokens_map, controls)


#: Finished requests' keys and values kept for reuse when --kv-cache-gib does not say.
DEFAULT_PREFIX_GIB = 1.0


class TransformersEngine(LocalEngine):
    kind = "transformers"
    serves_adapters = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        context_length: int,
        chat_template: str | None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefix_gib: float = DEFAULT_PREFIX_GIB,
        exact: bool = True,
        kv_cache: str = "f16",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = context_length
        self.template = chat_template_of(tokenizer, name, chat_template)
        self.device = model.device
        self.placement = str(model.device)
        self.eos_ids = eos_ids(model, tokenizer)
        self._cache_kw = cache_kwarg(model)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefix_gib = prefix_gib
        self.exact = exact
        self.kv_cache = kv_cache

    @classmethod
    def load(
        cls,
        path: Path,
        settings: LoadSettings,
        name: str,
        adapter: Path | None = None,
        ref: ModelRef | None = None,
    ) -> TransformersEngine:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmhost.hardware import pick_device, pick_dtype

        config = read_config(path)
        if config.get("auto_map") and not settings.trust_remote_code:
            raise LlmhostError(
                f"the model in {path} ships its own Python code (auto_map in config.json); "
                "pass --trust-remote-code only if you trust its author" + successor_hint(ref)
            )
        if not any(path.glob("*.safetensors")):
            raise LlmhostError(
                f"{path} holds no .safetensors weights; llmhost does not load pickle (.bin) "
                "weights: convert them to safetensors or use a safetensors/GGUF release"
            )
        template = settings.read_chat_template()
        device = pick_device(settings.device)
        dtype = getattr(torch, pick_dtype(settings.dtype, device))
        remote = settings.trust_remote_code
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote, "use_safetensors": True}
        if device.startswith("cuda"):
            kwargs["device_map"] = "auto" if device == "cuda" else device
        with load_errors(path, ref, remote):
            hf_kvcache.check(path, settings.kv_cache, remote)  # before the weights: a refusal loads none
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if adapter is not None:  # merged once: inference then runs at the base model's speed
            from peft import PeftModel

            with load_errors(adapter, ref):
                model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if not device.startswith("cuda"):
            model.to(device)
        model.eval()
        ctx = settings.context_length or context_length_of(model.config)
        kept = settings.kv_cache_gib if settings.kv_cache_gib is not None else _default_kept_gib(device)
        engine = cls(
            model,
            tokenizer,
            name,
            ctx,
            template,
            settings.max_concurrency,
            settings.max_queue,
            kept,
            settings.exact_prefix,
            settings.kv_cache,
        )
        engine.speculative = settings.speculative
        return engine

    # -- prompt preparation ---------------------------------------------------------------

    def encode_markup(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    @property
    def decoder(self) -> Any:  # the HF tokenizer decodes for the shared text code
        return self.tokenizer

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def grammar_tokenizer(self) -> Any:
        from llmhost.engine.grammar import load_llguidance

        load_llguidance()
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, eos_token=sorted(self.eos_ids))

    def runner(self) -> TransformersRunner:
        kept = int(self.prefix_gib * 2**30)
        return TransformersRunner(self.model, self._cache_kw, self.max_batch, kept, self.exact, self.kv_cache)


class TransformersRunner:
    """Batched decoding for transformers models with a plain (full-attention) dynamic KV cache.

    Rows are left-padded to a common length; the attention mask hides the padding and each row
    gets its own position ids, so a sequence decodes as it would alone.

    Prompts are evaluated in blocks of `block` positions from position 0, `chunk` tokens per call
    (chunked prefill: running requests step in between). A finished prompt's keys and values are
    kept in a PrefixCache (prefix.py), and a finished reply is evaluated again as prompt blocks
    while the engine is idle (`idle_work`): the next request that starts with the same tokens
    copies whole blocks and prefills the rest, and still equals a cold run, which evaluates the
    same blocks. With `exact` off (`--prefix-cache fast`), a finished request's decoded keys and
    values are kept as they are and shared token by token: a next turn sent at once prefills only
    its new message, and may differ from a cold run in the last bits.
    """

    def __init__(
        self,
        model: Any,
        cache_kw: str,
        max_batch: int,
        prefix_bytes: int = 0,
        exact: bool = True,
        kv_cache: str = "f16",
    ) -> None:
        from llmhost.engine.backends.prefix import PrefixCache
        from llmhost.hardware import torch_threads

        self.model = model
        self.device = model.device
        self._kw = cache_kw
        self.kv_cache = kv_cache  # f16 or q8_0 (hf_kvcache.py)
        plain = batchable(model)
        self.max_batch = max_batch if plain else 1
        gpu = self.device.type != "cpu"
        #: torch's own default: another engine's thread may have set a different count
        self.torch_threads = torch_threads()
        self.block = 512 if gpu else 64  # a GPU evaluates 512 positions about as fast as 64
        self.chunk = 4 * self.block if gpu else 2 * self.block  # ≈0.1-0.3 s of prefill per call
        #: Kept keys and values; cutting them at a block needs plain full-attention layers.
        self.exact = exact
        share = self.block if exact else 1  # the unit of reuse: a whole block, or any token
        self.prefix = PrefixCache(prefix_bytes, share) if plain and prefix_bytes > 0 else None
        self._cache: Any = None
        self._mask: Any = None
        self._staged: tuple[Any, Any] | None = None  # (request, its cache) once its prompt is evaluated
        self._chunking: tuple[Any, Any] | None = None  # (request, its cache) while its prompt is evaluated
        #: Per running row: the tokens fed so far (prompt, then decoded; their count is the
        #: row's next position), its adapter, its prompt length.
        self._rows: list[tuple[list[int], str | None, int]] = []
        self._redo: deque[tuple[list[int], str | None]] = deque()  # finished replies to make reusable
        self._redoing: tuple[list[int], str | None, Any] | None = None
        #: LoRA adapters applied per row (lora.py), made on the first adapter added.
        self._lora: Any = None
        #: Speculation (speculation.py): a pass's cost and whether a verify pass computes a position
        #: as a decode step does, both measured at the first prefill; padding after each row's
        #: proposal in the last verify pass (dropped by `rollback`).
        self.batch_cost: Any = None
        self.verifies_exactly = False
        self.max_positions = self.chunk
        self._dead: list[int] = []

    def _forward(self, ids: Any, cache: Any, adapters: list[str | None], keep: int = 1, **extra: Any) -> Any:
        kwargs = {self._kw: cache, **extra}
        if self._lora is None:
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **kwargs)
        with self._lora.rows(adapters):
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **kwargs)

    def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Load a LoRA adapter next to the others (called on the inference thread)."""
        from llmhost.engine.backends.lora import RowLora

        if self._lora is None:
            self._lora = RowLora(self.model)
        self._lora.add(adapter_id, path)

    def remove_adapter(self, adapter_id: str) -> None:
        if self._lora is not None:
            self._lora.remove(adapter_id)
        if self.prefix is not None:
            self.prefix.drop_adapter(adapter_id)
        self._redo = deque(job for job in self._redo if job[1] != adapter_id)
        if self._redoing is not None and self._redoing[1] == adapter_id:
            self._redoing = None

    def prefill(self, req: Any) -> Any:
        logits = None
        while logits is None:
            logits = self.prefill_chunk(req)
        return logits

    def prefill_chunk(self, req: Any) -> Any:
        """The next `chunk` tokens of the prompt, in blocks; the logits after the last, else None."""
        import torch

        from llmhost.engine.backends.prefix import Entry

        ids = req.prompt_ids
        if self.batch_cost is None and self.max_batch > 1:  # the first prompt: what speculation needs
            self.batch_cost, self.verifies_exactly = hf_verify.measure_passes(self)
        if self._chunking is None or self._chunking[0] is not req:  # a new prompt
            entry, shared = self.prefix.find(ids, req.adapter) if self.prefix else (None, 0)
            req.seq.cached_tokens = shared
            cache = self._cache_from(entry, shared)
            if entry is not None and shared == len(ids):  # this very prompt: its logits are kept
                self._staged = (req, cache)
                return entry.logits.clone()
            self._chunking = (req, cache)
        cache = self._chunking[1]
        begin = cache.get_seq_length()
        end = min(len(ids), begin + self.chunk)
        for start in range(begin, end, self.block):
            part = ids[start : min(start + self.block, end)]
            out = self._forward(torch.tensor([part], device=self.device), cache, [req.adapter])
        if end < len(ids):
            return None
        self._chunking = None
        logits = out.logits[0, -1]
        if self.prefix is not None:  # the sampler's processors may write to `logits`: a copy is kept
            self.prefix.put(Entry(list(ids), _layers(cache), req.adapter, logits.clone()))
        self._staged = (req, cache)
        return logits

    def abort_prefill(self) -> None:
        self._chunking = None

    def new_cache(self) -> Any:
        return hf_kvcache.new_cache(self.model, self.kv_cache)

    def _cache_from(self, entry: Any, shared: int) -> Any:
        """A cache holding the first `shared` positions of `entry`."""
        cache = self.new_cache()
        if entry is not None and shared:
            hf_kvcache.restore(cache, entry.layers, shared)
        return cache

    def commit_prefill(self) -> None:
        import torch

        assert self._staged is not None
        (req, cache), self._staged = self._staged, None
        n = len(req.prompt_ids)
        self._rows.append((list(req.prompt_ids), req.adapter, n))
        ones = torch.ones((1, n), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask = cache, ones
            return
        width = max(self._mask.shape[1], n)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(ones, width)])

    def verify(self, reqs: list[Any], drafts: list[list[int]]) -> list[Any]:
        return hf_verify.verify(self, reqs, drafts)

    def rollback(self, row: int, n: int) -> None:
        hf_verify.rollback(self, row, n)

    def step(self, reqs: list[Any]) -> Any:
        import torch

        hf_verify.trim(self)
        ids = torch.tensor([[r.last_token] for r in reqs], device=self.device)
        positions = torch.tensor([[len(tokens)] for tokens, _, _ in self._rows], device=self.device)
        column = torch.ones((len(reqs), 1), dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, column], dim=1)
        adapters = [r.adapter for r in reqs]
        out = self._forward(ids, self._cache, adapters, attention_mask=self._mask, position_ids=positions)
        for (tokens, _, _), req in zip(self._rows, reqs, strict=True):
            tokens.append(req.last_token)
        return out.logits[:, -1]

    def has_room(self, req: Any) -> bool:
        return True  # the dynamic cache grows as needed

    def drop(self, keep: list[int]) -> None:
        import torch

        from llmhost.engine.backends.prefix import Entry

        kept = set(keep)
        for i, (tokens, adapter, prompt) in enumerate(self._rows):
            if i in kept or self.prefix is None:
                continue
            if not self.exact:  # the decoded keys and values, as they are
                self.prefix.put(Entry(list(tokens), self._row_layers(i, len(tokens)), adapter))
            elif len(tokens) // self.block > prompt // self.block:
                self._redo.append((tokens, adapter))  # a whole block of reply gained
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, device=self.device)
        longest = max(len(tokens) for tokens, _, _ in self._rows)
        trim = self._mask.shape[1] - longest  # columns that are padding in every kept row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self._mask = self._mask.index_select(0, idx)[:, trim:]

    def _row_layers(self, row: int, n: int) -> list[tuple[Any, Any]]:
        """A running row's last `n` positions of keys and values (rows are left-padded), copied."""
        return [
            (layer.keys[row : row + 1, :, -n:].clone(), layer.values[row : row + 1, :, -n:].clone())
            for layer in self._cache.layers
        ]

    def idle_work(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Evaluate one block of a finished reply again, as a prompt block, while no request
        runs; True while more remain. Its decoded keys and values were made one step at a time
        in a padded batch, which is not how a cold run evaluates them; made again in whole
        blocks, a conversation's next turn reuses them and prefills only its new message. A
        request that arrives meanwhile (`interrupt()`) stops the block at the next layer; the
        job starts again from what was kept."""
        import torch

        from llmhost.engine.backends.prefix import Entry

        if self._redoing is None:
            if not self._redo or self.prefix is None:
                return False
            tokens, adapter = self._redo[0]  # taken off only once it is `_redoing`: never neither
            tokens = tokens[: len(tokens) // self.block * self.block]
            entry, shared = self.prefix.find([*tokens, -1], adapter)  # -1: no prompt matches whole
            self._redoing = (tokens, adapter, self._cache_from(entry, shared))
            self._redo.popleft()
        tokens, adapter, cache = self._redoing
        start = cache.get_seq_length()
        if start < len(tokens):
            block = tokens[start : start + self.block]
            try:
                with _interruptible(self.model, interrupt):
                    self._forward(torch.tensor([block], device=self.device), cache, [adapter])
            except _Interrupted:  # some layers have the block, some not: this cache is dropped
                self._redo.appendleft((tokens, adapter))
                self._redoing = None
                return True
            # kept after every block: a request that arrives meanwhile reuses what is done
            self.prefix.put(Entry(tokens[: start + len(block)], _layers(cache), adapter))
        if cache.get_seq_length() >= len(tokens):
            self._redoing = None
        return bool(self._redo or self._redoing)

    def forget(self) -> None:
        """Drop every kept prefix and pending redo (the next requests start cold)."""
        if self.prefix is not None:
            self.prefix.clear()
        self._redo.clear()
        self._redoing = None


class _Interrupted(Exception):
    pass


@contextlib.contextmanager
def _interruptible(model: Any, interrupt: Callable[[], bool] | None) -> Iterator[None]:
    """Raise _Interrupted before any decoder layer once `interrupt()` is true."""
    import torch

    if interrupt is None:
        yield
        return
    n = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]

    def check(*_: Any) -> None:
        if interrupt():
            raise _Interrupted

    handles = [layer.register_forward_pre_hook(check) for stack in stacks[:1] for layer in stack]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _default_kept_gib(device: str) -> float:
    """DEFAULT_PREFIX_GIB, at most a quarter of the memory free once the model is loaded (a 6 GB
    GPU keeps the rest for the requests that run)."""
    import torch

    from llmhost.hardware import memory_gib

    free = torch.cuda.mem_get_info()[0] / 2**30 if device.startswith("cuda") else memory_gib()[1]
    return min(DEFAULT_PREFIX_GIB, free / 4) if free > 0 else DEFAULT_PREFIX_GIB


def _pad_left(t: Any, width: int) -> Any:
    """Zero-pad dim 2 (KV tensors [B, H, T, D]) or dim 1 (masks [B, T]) on the left to `width`."""
    import torch.nn.functional as F

    missing = width - (t.shape[2] if t.dim() == 4 else t.shape[1])
    if missing == 0:
        return t
    pad = (0, 0, missing, 0) if t.dim() == 4 else (missing, 0)
    return F.pad(t, pad)
