"""GGUF → Hugging Face folder, converted once and cached.

Loading a GGUF through transformers converts the tokenizer and dequantizes every tensor (≈17 s
for the embedded model); the saved folder loads in ≈2 s. The cache is written to a temporary
folder and renamed into place, so an interrupted conversion never leaves a folder that loads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmhost.engine.cached import build_once
from llmhost.errors import LlmhostError


class GGUFReadError(LlmhostError):
    """The file could not be read as a GGUF model (its reference says how to mend it)."""


def check_readable(gguf: Path) -> None:
    """Raise GGUFReadError unless the header and every tensor's data are in the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:
        raise GGUFReadError(f"{type(err).__name__}: {err}".splitlines()[0]) from None
    size = gguf.stat().st_size
    if end > size:
        raise GGUFReadError(f"its tensors need {end} bytes, the file has {size}")


def cache_key(gguf: Path, version: str | None = None) -> str:
    """Identity of a GGUF file: package version + size when embedded, else path + size + mtime."""
    st = gguf.stat()
    ident = f"{version}:{st.st_size}" if version else f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def converted_folder(gguf: Path, cache_root: Path, key: str) -> Path:
    """The HF folder for `gguf` under `cache_root`, converting it first if needed."""
    target = cache_root / f"{gguf.stem}-{key}"
    return build_once(target, lambda out: _convert(gguf, out), gguf, GGUFReadError)


def _convert(gguf: Path, out: Path) -> None:
    import functools

    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(gguf_utils.tqdm, functools.partial):  # its progress bar is noise to a user
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # float32 keeps the dequantized weights exact; load() casts to the dtype it runs in.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer refuses to serialize; the weights are already dense float32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
