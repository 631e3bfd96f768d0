"""`load(typed)`: what a user typed → a running engine, and which engine `auto` means."""

from __future__ import annotations

import importlib
import logging

from llmhost.config import VLLM_ONLY, LoadSettings
from llmhost.engine.base import Engine
from llmhost.engine.ref import ModelRef, resolve_ref
from llmhost.errors import InvalidRequestError

log = logging.getLogger("llmhost")


def load(typed: str | None = None, settings: LoadSettings | None = None) -> Engine:
    """Load a model: the embedded default (nothing typed), a store name, a local HF folder or a
    local .gguf file; with an upstream, a model name there. A fine-tuned store model loads its
    base and merges its LoRA adapter."""
    settings = settings or LoadSettings()
    if uses_upstream(settings):
        from llmhost.engine.backends import openai

        check_vllm_flags(settings)
        check_engine_settings("openai", settings)
        return openai.load(typed, settings)
    return load_ref(resolve_ref(typed), settings)


def load_ref(ref: ModelRef, settings: LoadSettings) -> Engine:
    """Load a resolved reference on the engine `choose_engine` picks."""
    kind = choose_engine(ref, settings)
    check_engine_settings(kind, settings)
    backend = importlib.import_module(f"llmhost.engine.backends.{kind}")
    engine = backend.load(ref.name if kind == "openai" else ref, settings)  # a name on the upstream
    from llmhost.engine.local import LocalEngine

    if isinstance(engine, LocalEngine):
        engine.warm_up()
    return engine


def uses_upstream(settings: LoadSettings) -> bool:
    """The one rule: `--engine openai`, or `auto` with `--upstream`, serves an upstream's models."""
    return settings.engine == "openai" or (settings.engine == "auto" and bool(settings.upstream))


def check_vllm_flags(settings: LoadSettings) -> None:
    fields = type(settings).model_fields
    vllm_flags = [f for f in VLLM_ONLY if getattr(settings, f) != fields[f].default]
    if vllm_flags and settings.engine != "vllm":
        flag = "--" + vllm_flags[0].replace("_", "-")
        raise InvalidRequestError(f"{flag} is a vLLM setting: add --engine vllm")


def check_engine_settings(kind: str, settings: LoadSettings) -> None:
    """A quantized KV cache is llama.cpp's, forced speculation the local engines': the others
    refuse them rather than ignore them."""
    if settings.speculative == "ngram" and kind not in ("llamacpp", "transformers"):
        hint = {"vllm": ": pass vLLM's own --speculative-config through --vllm-args"}.get(kind, "")
        raise InvalidRequestError(
            f"--speculative ngram is the llama.cpp and transformers engines'; the {kind} engine's "
            f"server decides its own decoding{hint}"
        )
    if settings.speculative == "draft" and not settings.draft_model:
        raise InvalidRequestError(
            "--speculative draft needs --draft-model NAME (a small model of the same tokenizer)"
        )
    if settings.draft_model and kind != "llamacpp":
        raise InvalidRequestError(
            f"--draft-model is the llama.cpp engine's (GGUF models); the {kind} engine has no draft "
            "model: use --speculative ngram (prompt lookup) there"
        )
    if (
        settings.kv_cache == "f16"
        or kind == "llamacpp"
        or (kind, settings.kv_cache) == ("transformers", "q8_0")
    ):
        return
    if kind == "transformers":
        raise InvalidRequestError(
            f"--kv-cache {settings.kv_cache} is llama.cpp's (GGUF models); the transformers engine "
            "keeps f16 or q8_0: serve a GGUF of the model on llama.cpp for q4_0"
        )
    hint = {"vllm": ": pass --vllm-args '--kv-cache-dtype fp8' for vLLM's 8-bit cache"}.get(kind, "")
    raise InvalidRequestError(
        f"--kv-cache {settings.kv_cache} is for the llama.cpp and transformers engines; the {kind} "
        f"engine keeps a 16-bit cache{hint}"
    )


def choose_engine(ref: ModelRef, settings: LoadSettings) -> str:
    """The engine for `ref`: the one asked for; for `auto`, openai with --upstream, llama.cpp for
    GGUF models when it is installed (fine-tuned adapters and explicit GPU devices stay on
    transformers), else transformers. vLLM only when asked for."""
    check_vllm_flags(settings)
    if uses_upstream(settings):
        return "openai"
    if settings.engine != "auto":
        return settings.engine
    if settings.device not in ("auto", "cpu") or not ref.is_gguf:
        return "transformers"
    from llmhost.engine.backends.llamacpp import INSTALL, available

    if available():
        return "llamacpp"
    log.warning("hint: GGUF models run about 4x faster on the CPU with llama.cpp: %s", INSTALL)
    return "transformers"
