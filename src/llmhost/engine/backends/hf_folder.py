"""Reading a Hugging Face model folder for the transformers engine: its config, and whatever
loading it raises (a damaged file, remote code that fails, a too-new architecture) as one line
that says what to do."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost.engine.ref import ModelRef
from llmhost.errors import DamagedModelError, LlmhostError


def successor_hint(ref: ModelRef | None) -> str:
    """For a catalog model pulled into the store: its successor that needs no remote code."""
    from llmhost.store.catalog import find

    stored = ref.record if ref is not None else None
    entry = find(stored.catalog) if stored and stored.catalog else None
    if entry and entry.successor:
        return f", or use its successor {entry.successor} (llmhost pull {entry.successor})"
    return ""


# what reading a truncated or corrupt file raises, by library (safetensors, json, tokenizers)
DAMAGE = ("SafetensorError", "JSONDecodeError", "HeaderTooLarge", "UnicodeDecodeError")


@contextlib.contextmanager
def load_errors(path: Path, ref: ModelRef | None, remote: bool = False) -> Iterator[None]:
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
        damaged = type(err).__name__ in DAMAGE or "did not match any variant" in str(err)
        if damaged:
            file = unreadable_file(path) or path
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


def unreadable_file(folder: Path) -> Path | None:
    """Which weights or JSON file of a folder cannot be read (to name it in the error)."""
    from safetensors import safe_open

    from llmhost.store.weights import safetensors_header

    for file in sorted(folder.glob("*.safetensors")):
        try:
            safetensors_header(file)
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


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LlmhostError(f"{path} is not a model folder: config.json unreadable ({err})") from None


# -- what the runner reads of a loaded model ------------------------------------------------------


def batchable(model: Any) -> bool:
    """Row merging needs plain full-attention cache layers (no sliding windows, no SSM state)."""
    return plain_cache(model.config)


def plain_cache(config: Any) -> bool:
    """Whether every cache layer of a model with this config is a plain full-attention one."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def context_length_of(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    return context_length_of(text) if text is not None else 2048


def cache_kwarg(model: Any) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; accept both."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
