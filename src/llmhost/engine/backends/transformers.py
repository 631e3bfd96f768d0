"""`--engine transformers`: a Hugging Face folder on CPU or GPU, one decode loop for every caller."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.local import LocalEngine
from llmhost.engine.ref import ModelRef
from llmhost.engine.template import ChatTemplate, control_tokens
from llmhost.errors import DamagedModelError, LlmhostError


def load(ref: ModelRef, settings: LoadSettings) -> TransformersEngine:
    """A Hugging Face folder (GGUF models converted once); an adapter is merged into its base."""
    if ref.is_adapter:
        assert ref.base is not None
        return TransformersEngine.load(ref.base.hf_folder(), settings, ref.name, adapter=ref.path, ref=ref)
    return TransformersEngine.load(ref.hf_folder(), settings, ref.name, ref=ref)


def chat_template_of(tokenizer: Any, name: str, override: str | None = None) -> ChatTemplate:
    """The template a transformers tokenizer carries (or `override`), with its control tokens."""
    source = override or getattr(tokenizer, "chat_template", None)
    added = tokenizer.added_tokens_decoder.values()
    controls = control_tokens(
        [t.content for t in added if t.special], [t.content for t in added if not t.special], source
    )
    return ChatTemplate(source, name, tokenizer.special_tokens_map, controls)


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = context_length
        self.template = chat_template_of(tokenizer, name, chat_template)
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = _cache_kwarg(model)
        self.max_batch = max_batch
        self.max_queue = max_queue

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

        config = _read_config(path)
        if config.get("auto_map") and not settings.trust_remote_code:
            raise LlmhostError(
                f"the model in {path} ships its own Python code (auto_map in config.json); "
                "pass --trust-remote-code only if you trust its author" + _successor_hint(ref)
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
        with _load_errors(path, ref, remote):
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if adapter is not None:  # merged once: inference then runs at the base model's speed
            from peft import PeftModel

            with _load_errors(adapter, ref):
                model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if not device.startswith("cuda"):
            model.to(device)
        model.eval()
        ctx = settings.context_length or _context_length(model.config)
        return cls(model, tokenizer, name, ctx, template, settings.max_concurrency, settings.max_queue)

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
        return TransformersRunner(self.model, self._cache_kw, self.max_batch)


class TransformersRunner:
    """Batched decoding for transformers models with a plain (full-attention) dynamic KV cache.

    Rows are left-padded to a common length; the attention mask hides the padding and each row
    gets its own position ids, so a sequence decodes as it would alone.
    """

    def __init__(self, model: Any, cache_kw: str, max_batch: int) -> None:
        self.model = model
        self.device = model.device
        self._kw = cache_kw
        self.max_batch = max_batch if _batchable(model) else 1
        self._cache: Any = None
        self._mask: Any = None
        self._lens: list[int] = []
        self._staged: tuple[Any, int] | None = None
        #: LoRA adapters applied per row (lora.py), made on the first adapter added.
        self._lora: Any = None

    def _forward(self, ids: Any, cache: Any, reqs: list[Any], **extra: Any) -> Any:
        kwargs = {self._kw: cache, **extra}
        if self._lora is None:
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        with self._lora.rows([r.adapter for r in reqs]):
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)

    def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Load a LoRA adapter next to the others (called on the inference thread)."""
        from llmhost.engine.backends.lora import RowLora

        if self._lora is None:
            self._lora = RowLora(self.model)
        self._lora.add(adapter_id, path)

    def remove_adapter(self, adapter_id: str) -> None:
        if self._lora is not None:
            self._lora.remove(adapter_id)

    def prefill(self, req: Any) -> Any:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self._forward(torch.tensor([req.prompt_ids], device=self.device), cache, [req])
        self._staged = (cache, len(req.prompt_ids))
        return out.logits[0, -1]

    def commit_prefill(self) -> None:
        import torch

        assert self._staged is not None
        cache, n = self._staged
        self._staged = None
        ones = torch.ones((1, n), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask, self._lens = cache, ones, [n]
            return
        width = max(self._mask.shape[1], n)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(ones, width)])
        self._lens.append(n)

    def step(self, reqs: list[Any]) -> Any:
        import torch

        ids = torch.tensor([[r.last_token] for r in reqs], device=self.device)
        positions = torch.tensor([[n] for n in self._lens], device=self.device)
        column = torch.ones((len(reqs), 1), dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, column], dim=1)
        out = self._forward(ids, self._cache, reqs, attention_mask=self._mask, position_ids=positions)
        self._lens = [n + 1 for n in self._lens]
        return out.logits[:, -1]

    def has_room(self, req: Any) -> bool:
        return True  # the dynamic cache grows as needed

    def drop(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self._cache, self._mask, self._lens = None, None, []
            return
        idx = torch.tensor(keep, device=self.device)
        self._lens = [self._lens[i] for i in keep]
        trim = self._mask.shape[1] - max(self._lens)  # columns that are padding in every kept row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self._mask = self._mask.index_select(0, idx)[:, trim:]


def _pad_left(t: Any, width: int) -> Any:
    """Zero-pad dim 2 (KV tensors [B, H, T, D]) or dim 1 (masks [B, T]) on the left to `width`."""
    import torch.nn.functional as F

    missing = width - (t.shape[2] if t.dim() == 4 else t.shape[1])
    if missing == 0:
        return t
    pad = (0, 0, missing, 0) if t.dim() == 4 else (missing, 0)
    return F.pad(t, pad)


def _batchable(model: Any) -> bool:
    """Row merging needs plain full-attention cache layers (no sliding windows, no SSM state)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _successor_hint(ref: ModelRef | None) -> str:
    """For a catalog model pulled into the store: its successor that needs no remote code."""
    from llmhost.store.catalog import find

    stored = ref.record if ref is not None else None
    entry = find(stored.catalog) if stored and stored.catalog else None
    if entry and entry.successor:
        return f", or use its successor {entry.successor} (llmhost pull {entry.successor})"
    return ""


# what reading a truncated or corrupt file raises, by library (safetensors, json, tokenizers)
_DAMAGE = ("SafetensorError", "JSONDecodeError", "HeaderTooLarge", "UnicodeDecodeError")


@contextlib.contextmanager
def _load_errors(path: Path, ref: ModelRef | None, remote: bool = False) -> Iterator[None]:
    """Whatever transformers, peft or a model's own code raise while loading → one line that
    says what to do."""
    import transformers

    try:
        yield
    except LlmhostError:
        raise
    except MemoryError:
        raise LlmhostError(
            f"not enough memory to load {path}: try a smaller model or a GGUF quantization"
        ) from None
    except (Exception, SystemExit) as err:  # a model's own code may even exit
        detail = f"{type(err).__name__}: {err}".splitlines()[0]
        damaged = type(err).__name__ in _DAMAGE or "did not match any variant" in str(err)
        if damaged:
            file = _unreadable_file(path) or path
            if ref is not None:
                raise ref.damaged(file, detail) from None
            raise DamagedModelError(
                f"{file} could not be read ({detail}): it is damaged or incomplete"
            ) from None
        if remote:
            raise LlmhostError(
                f"the model in {path} runs its own code (--trust-remote-code), which failed under "
                f"transformers {transformers.__version__}: {detail}. Install what it names, or use a "
                "release of the model that transformers supports without remote code"
            ) from None
        raise LlmhostError(
            f"transformers {transformers.__version__} could not load {path} ({detail}); if the model is "
            "newer than this transformers, upgrade it (pip install -U transformers)"
        ) from None


def _unreadable_file(folder: Path) -> Path | None:
    """Which weights or JSON file of a folder cannot be read (to name it in the error)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception:
            return file
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return file
    return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LlmhostError(f"{path} is not a model folder: config.json unreadable ({err})") from None


def _context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    return _context_length(text) if text is not None else 2048


def _cache_kwarg(model: Any) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; accept both."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
