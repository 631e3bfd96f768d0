"""`load(ref)`: turn what a user typed into a running engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmhost.config import VLLM_ONLY, LoadSettings, llmhost_home
from llmhost.engine.base import Engine
from llmhost.errors import InvalidRequestError, ModelNotFoundError
from llmhost.store.embedded import DEFAULT_MODEL_NAME, embedded_gguf

log = logging.getLogger("llmhost")

DEFAULT_REFS = {None, "", "default", DEFAULT_MODEL_NAME}


def resolve(ref: str | None) -> tuple[Path, str]:
    """A loadable HF folder and a display name for `ref`, converting GGUF files on first use."""
    from llmhost.engine.gguf import cache_key, converted_folder

    cache_root = llmhost_home() / "converted"
    if ref in DEFAULT_REFS:
        gguf, version = embedded_gguf()
        return converted_folder(gguf, cache_root, cache_key(gguf, version)), DEFAULT_MODEL_NAME
    assert ref is not None
    path = Path(ref).expanduser()
    if not path.exists():
        path = _from_store(ref)
    if path.is_file() and path.suffix == ".gguf":
        return converted_folder(path, cache_root, cache_key(path)), _display_name(ref, path, path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, _display_name(ref, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return converted_folder(ggufs[0], cache_root, cache_key(ggufs[0])), ggufs[0].stem
        raise ModelNotFoundError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor a folder with one .gguf file"
        )
    raise ModelNotFoundError(
        f"no model {ref!r}: give a store name (`llmhost list`), a local Hugging Face folder or a "
        f".gguf file, or leave it out for the embedded default ({DEFAULT_MODEL_NAME})"
    )


def _from_store(ref: str) -> Path:
    """A store name → the path to load; a catalog name not pulled yet → how to pull it."""
    from llmhost.store.catalog import find
    from llmhost.store.local import Store

    store = Store()
    entry = find(ref)
    stored = store.get(ref) or (store.get(entry.name) if entry else None)
    if stored is not None:
        return stored.load_path
    if entry is not None:
        raise ModelNotFoundError(
            f"{entry.name} is in the catalog but not downloaded: run `llmhost pull {entry.name}`"
        )
    return Path(ref)  # reported as not found below


def _display_name(ref: str, path: Path, default: str | None = None) -> str:
    """A store name is the model's name; a path is named after its folder or file."""
    from llmhost.errors import InvalidRequestError
    from llmhost.store.names import check_name

    if not Path(ref).expanduser().exists():
        try:
            return check_name(ref)
        except InvalidRequestError:
            pass
    return default or path.name


def load(ref: str | None = None, settings: LoadSettings | None = None) -> Engine:
    """Load a model: the embedded default (no ref), a store name, a local HF folder or a local
    .gguf file. A fine-tuned store model loads its base and merges its LoRA adapter."""
    settings = settings or LoadSettings()
    adapter = stored_adapter(ref)
    engine = choose_engine(ref, settings, adapter is not None)
    if engine == "openai":
        from llmhost.engine.upstream import OpenAIEngine

        return OpenAIEngine.connect(settings.upstream, settings.upstream_key, ref)
    if engine == "llamacpp":
        from llmhost.engine.llamacpp import LlamaCppEngine

        gguf, name = gguf_file(ref)
        return LlamaCppEngine.load(gguf, settings, name)
    if engine == "vllm":
        from llmhost.engine.vllm import VLLMEngine

        if adapter is not None:
            raise InvalidRequestError(
                f"{ref} is a LoRA adapter: `llmhost merge {ref} NAME` makes a standalone model vLLM can serve"
            )
        path, name = resolve(ref)
        return VLLMEngine.start(path, name, settings)
    from llmhost.engine.hf import TransformersEngine

    if adapter is not None:
        base = adapter.extra.get("base", "default")
        path, _ = resolve(None if base == "default" else base)
        return TransformersEngine.load(path, settings, adapter.name, adapter=adapter.folder)
    path, name = resolve(ref)
    return TransformersEngine.load(path, settings, name)


def choose_engine(ref: str | None, settings: LoadSettings, adapter: bool = False) -> str:
    """The engine `auto` means for `ref`: openai with --upstream, llama.cpp for GGUF models when
    it is installed (fine-tuned adapters and explicit GPU devices stay on transformers), else
    transformers. vLLM only when asked for."""
    fields = type(settings).model_fields
    vllm_flags = [f for f in VLLM_ONLY if getattr(settings, f) != fields[f].default]
    if vllm_flags and settings.engine != "vllm":
        flag = "--" + vllm_flags[0].replace("_", "-")
        raise InvalidRequestError(f"{flag} is a vLLM setting: add --engine vllm")
    if settings.engine != "auto":
        return settings.engine
    if settings.upstream:
        return "openai"
    if settings.device not in ("auto", "cpu") or adapter or not is_gguf(ref):
        return "transformers"
    from llmhost.engine.llamacpp import INSTALL, available

    if available():
        return "llamacpp"
    log.warning("hint: GGUF models run about 4x faster on the CPU with llama.cpp: %s", INSTALL)
    return "transformers"


def is_gguf(ref: str | None) -> bool:
    """Whether `ref` names a GGUF model (the embedded default is one)."""
    if ref in DEFAULT_REFS:
        return True
    assert ref is not None
    path = Path(ref).expanduser()
    if not path.exists():
        try:
            path = _from_store(ref)
        except ModelNotFoundError:
            return False
    if path.is_dir():
        return not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1
    return path.suffix == ".gguf"


def gguf_file(ref: str | None) -> tuple[Path, str]:
    """The GGUF file behind `ref` (the embedded default, a .gguf path, a folder with one, or a
    GGUF store model), for engines that read GGUF themselves."""
    if ref in DEFAULT_REFS:
        return embedded_gguf()[0], DEFAULT_MODEL_NAME
    assert ref is not None
    path = Path(ref).expanduser()
    if not path.exists():
        path = _from_store(ref)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        path = found[0] if len(found) == 1 else path
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ModelNotFoundError(f"{ref!r} is not a GGUF model: the llama.cpp engine reads .gguf files")
    return path, _display_name(ref, path, path.stem)


def stored_adapter(ref: str | None) -> Any:
    """The store record of `ref` when it names a LoRA adapter (the result of `llmhost finetune`)."""
    if not ref or Path(ref).expanduser().exists():
        return None
    from llmhost.store.local import Store

    stored = Store().get(ref)
    return stored if stored is not None and stored.format == "lora" else None
