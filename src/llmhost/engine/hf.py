"""The transformers engine: a Hugging Face folder on CPU or GPU, one decode loop for every caller."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.base import Engine
from llmhost.engine.context import Message, fit_messages, validate_messages
from llmhost.engine.params import GenerationParams
from llmhost.engine.sampling import sample_next
from llmhost.engine.sequence import SequenceState
from llmhost.engine.types import Chunk
from llmhost.errors import ChatTemplateError, ContextOverflowError, InvalidRequestError, LlmhostError


class TransformersEngine(Engine):
    def __init__(
        self, model: Any, tokenizer: Any, name: str, context_length: int, chat_template: str | None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = context_length
        self.chat_template = chat_template
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = _cache_kwarg(model)

    @classmethod
    def load(cls, path: Path, settings: LoadSettings, name: str) -> TransformersEngine:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmhost.hardware import pick_device, pick_dtype

        config = _read_config(path)
        if config.get("auto_map") and not settings.trust_remote_code:
            raise LlmhostError(
                f"the model in {path} ships its own Python code (auto_map in config.json); "
                "pass --trust-remote-code only if you trust its author"
            )
        if not any(path.glob("*.safetensors")):
            raise LlmhostError(
                f"{path} holds no .safetensors weights; llmhost does not load pickle (.bin) "
                "weights: convert them to safetensors or use a safetensors/GGUF release"
            )
        device = pick_device(settings.device)
        dtype = getattr(torch, pick_dtype(settings.dtype, device))
        remote = settings.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote, "use_safetensors": True}
        if device.startswith("cuda"):
            kwargs["device_map"] = "auto" if device == "cuda" else device
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if not device.startswith("cuda"):
            model.to(device)
        model.eval()
        template = None
        if settings.chat_template is not None:
            template = Path(settings.chat_template).read_text(encoding="utf-8")
        ctx = settings.context_length or _context_length(model.config)
        return cls(model, tokenizer, name, ctx, template)

    # -- prompt preparation ---------------------------------------------------------------

    def render(self, messages: list[Message]) -> str:
        """The chat template applied by transformers' sandboxed Jinja environment."""
        from jinja2 import TemplateError

        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"the model {self.name} has no chat template: pass --chat-template FILE "
                "(a Jinja file), or send a plain prompt instead of messages"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template refused these messages: {err}") from None

    def encode_chat(self, messages: list[Message]) -> list[int]:
        # templates write their own special tokens (BOS included), so none are added here
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def prepare(
        self, messages: list[Message] | None, prompt: str | None, params: GenerationParams
    ) -> tuple[list[int], int]:
        """Prompt token ids and how many history messages were dropped to fit the window."""
        if (messages is None) == (prompt is None):
            raise InvalidRequestError("give either messages or a prompt")
        if prompt is not None:
            ids = self.tokenizer(prompt)["input_ids"]
            if len(ids) + params.max_new_tokens > self.context_length:
                raise ContextOverflowError(len(ids), params.max_new_tokens, self.context_length)
            return ids, 0
        assert messages is not None
        validate_messages(messages)
        if params.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": params.system}, *messages]
        kept, dropped, _ = fit_messages(
            messages, lambda m: len(self.encode_chat(m)), params.max_new_tokens, self.context_length
        )
        return self.encode_chat(kept), dropped

    # -- decoding -------------------------------------------------------------------------

    def stream(
        self,
        messages: list[Message] | None = None,
        params: GenerationParams | None = None,
        *,
        prompt: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        started = time.perf_counter()
        params = params or GenerationParams()
        prompt_ids, dropped = self.prepare(messages, prompt, params)
        seq = SequenceState(self.tokenizer, params, len(prompt_ids), self.eos_ids, started, dropped)
        return self._decode(prompt_ids, seq, cancel)

    def _decode(
        self, prompt_ids: list[int], seq: SequenceState, cancel: threading.Event | None
    ) -> Iterator[Chunk]:
        import torch
        from transformers import DynamicCache

        params = seq.params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        penalize = params.repetition_penalty != 1.0
        seen = list(prompt_ids)
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt_ids], device=self.device)
        while True:
            if cancel is not None and cancel.is_set():
                yield seq.finish("cancelled")
                return
            # inference mode per step: a generator must not leave it switched on for its caller
            with torch.inference_mode():
                kw = {self._cache_kw: cache}
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
                seen_t = torch.tensor(seen, device=self.device) if penalize else None
                token = sample_next(out.logits[0, -1], params, generator, seen_t)
            chunk = seq.add(token)
            yield chunk
            if seq.finished:
                return
            if penalize:
                seen.append(token)
            ids = torch.tensor([[token]], device=self.device)


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
