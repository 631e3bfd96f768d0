"""How much memory a model needs: weights + KV cache + runtime overhead.

weights  = parameters × bytes per parameter of the dtype or GGUF quantization
kv cache = 2 (K and V) × layers × KV heads × head dim × context tokens × bytes per value
overhead = runtime buffers and activations: 10% of the weights, plus 0.5 GiB on a GPU for the
           CUDA context and allocator (0.25 GiB on a CPU)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llmhost.config import KV_ELEMENT_BYTES, LoadSettings
from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.store.catalog import CatalogEntry

GIB = 2**30

BYTES_PER_PARAM = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "int8": 1.0,  # bitsandbytes 8-bit (plus its scales, in the overhead)
    "int4": 0.5625,  # bitsandbytes nf4 with its block scales
    "q8_0": 8.5 / 8,  # GGUF: bits per weight, block scales included
    "q6_k": 6.5625 / 8,
    "q5_k_m": 5.69 / 8,
    "q4_k_m": 4.85 / 8,
    "q4_0": 4.5 / 8,
}


@dataclass(frozen=True)
class Shape:
    """What sizes a model's memory: from the catalog or from a config.json."""

    params: float
    layers: int
    kv_heads: int
    head_dim: int
    context: int


@dataclass(frozen=True)
class Estimate:
    dtype: str
    context: int
    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    kv_cache: str = "f16"

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "total_gib": round(self.total_gib, 3)}


def shape_of(entry: CatalogEntry) -> Shape:
    return Shape(entry.params_b * 1e9, entry.layers, entry.kv_heads, entry.head_dim, entry.context)


def shape_from_folder(folder: Path) -> Shape:
    """Read layers, heads and context from config.json and count parameters from the
    safetensors headers (no weights are loaded)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidRequestError(f"cannot read {folder / 'config.json'}: {err}") from None
    config = config.get("text_config", config)
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1))
    params = 0
    for file in folder.glob("*.safetensors"):
        params += _count_params(file)
    # embedding models (a sentence-transformers Pooling module) and cross-encoders keep no KV cache
    encoder = (folder / "1_Pooling").is_dir() or any(
        str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []
    )
    return Shape(
        params=float(params),
        layers=int(config.get("num_hidden_layers", 0)),
        kv_heads=0 if encoder else int(config.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        context=int(config.get("max_position_embeddings", 0)),
    )


def _count_params(file: Path) -> int:
    """Sum of tensor sizes from a safetensors header (8-byte length, then JSON)."""
    from llmhost.store.weights import safetensors_header

    total = 0
    for name, info in safetensors_header(file).items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= dim
        total += n
    return total


def estimate(
    shape: Shape, dtype: str, context: int | None = None, gpu: bool = True, kv_cache: str | None = None
) -> Estimate:
    """`kv_cache`: llama.cpp's --kv-cache type (q8_0, q4_0); by default the weights' 16 bits."""
    if dtype not in BYTES_PER_PARAM:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; one of {', '.join(BYTES_PER_PARAM)}")
    ctx = min(context or shape.context, shape.context) if shape.context else (context or 4096)
    weights = shape.params * BYTES_PER_PARAM[dtype]
    # quantized weights still keep a 16-bit cache, unless llama.cpp's --kv-cache says otherwise
    kv_bytes = KV_ELEMENT_BYTES[kv_cache] if kv_cache else 4 if dtype == "float32" else 2
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * ctx * kv_bytes
    overhead = 0.10 * weights + (0.5 if gpu else 0.25) * GIB
    cache = kv_cache or ("float32" if kv_bytes == 4 else "f16")
    return Estimate(dtype, ctx, weights / GIB, kv / GIB, overhead / GIB, cache)


def load_estimate_gib(path: Path, is_gguf: bool, load: LoadSettings) -> float:
    """Memory a model takes once loaded with `load`, before loading it: the weights at the dtype
    they load as, the KV cache, runtime overhead (what the server's pool budgets with)."""
    gpu = load.device.startswith("cuda")
    if is_gguf:
        weights = path.stat().st_size / 2**30
        slots = load.max_concurrency * (load.context_length or 4096)
        per_token = 24 * 1024 * KV_ELEMENT_BYTES[load.kv_cache] / 2  # ≈ a 1.5B model's f16 keys and values
        return weights * 1.1 + slots * per_token / 2**30 + (0.5 if gpu else 0.25)
    with contextlib.suppress(LlmhostError, OSError, ValueError, KeyError):
        dtype = load.dtype if load.dtype != "auto" else ("bfloat16" if gpu else "float32")
        return estimate(shape_from_folder(path), dtype, load.context_length or 4096, gpu=gpu).total_gib
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return size / 2**30 * 2.2 + 0.25
