"""What a GGUF file says of itself (read once per load), and how many of its layers go to the GPU.

llama.cpp runs every layer it is given on the GPU its build supports (CUDA, Metal, ROCm, Vulkan)
and the rest on the CPU. llama-cpp-python gives none by default, so a GPU build would run on the
CPU; here `--n-gpu-layers` auto gives all layers when they fit the free GPU memory, as many as fit
otherwise, and none on a CPU build (`llama_supports_gpu_offload()` says which build it is).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmhost.engine.backends.llamacpp.repack as repack
from llmhost.config import KV_ELEMENT_BYTES, LoadSettings
from llmhost.engine.backends.llamacpp.logs import ERRORS
from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.installs import LLAMACPP_GPU_BUILD, llamacpp_offloads

log = logging.getLogger("llmhost.llamacpp")

#: llama.cpp's pooling types (llama_pooling_type).
POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
#: llama.cpp's encoder-only architectures (BERT and XLM-R convert as "bert").
ENCODERS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "neo-bert", "modern-bert", "t5encoder"}
#: A request's window when neither --context-length nor --kv-cache-gib says otherwise: each of
#: the --max-concurrency slots keeps a KV stream this long (Ollama's default is 4096 too).
DEFAULT_SLOT_TOKENS = 4096
#: --kv-cache → ggml's type ids (GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0)
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
#: GPU memory kept free beside the layers: the CUDA context, compute buffers, the output layer
GPU_RESERVE_GIB = 0.75


@dataclass(frozen=True)
class GgufFacts:
    """The metadata a load decides with: architecture, pooling, trained window, layer count."""

    arch: str
    pooling_type: int | None
    window: int
    layers: int
    classifier: bool  # a `cls.output` head: a reranker
    classifier_dense: bool  # a `cls` layer before it (XLM-R's head; a BERT's pooler is not kept)
    kv_bytes_per_token: int  # f16 keys and values of every layer

    def kv_bytes(self, settings: LoadSettings) -> int:
        """The KV cache a chat load allocates (the slots' streams, engine.slot_tokens' rule), in
        the --kv-cache type."""
        if settings.kv_cache_gib is not None:
            return int(settings.kv_cache_gib * 2**30)
        window = settings.context_length or min(self.window, DEFAULT_SLOT_TOKENS)
        per_token = self.kv_bytes_per_token * KV_ELEMENT_BYTES[settings.kv_cache] / 2
        return int(settings.max_concurrency * window * per_token)

    @property
    def pooling(self) -> tuple[str, int] | None:
        """The pooling type and trained window when it embeds or reranks; None for a chat model."""
        if self.classifier:
            return "rank", self.window
        if self.pooling_type is None:
            # an encoder says how it pools; one that does not cannot chat either
            return ("none", self.window) if self.arch in ENCODERS else None
        return POOLING.get(self.pooling_type, "unknown"), self.window


#: GGUF value types → struct formats of the fixed-size ones (8 is a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_facts(gguf: Path) -> GgufFacts:
    """The header's metadata and tensor names, read directly: gguf-py's GGUFReader parses every
    array element (a vocabulary of 150k strings) and takes seconds; this takes milliseconds."""
    from llmhost.engine.backends.gguf import GGUFReadError

    try:
        meta, names = _header(gguf)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise GGUFReadError(f"{type(err).__name__}: {err}".splitlines()[0]) from None
    arch = str(meta.get("general.architecture") or "")

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, (int, float)) else default

    pooling = meta.get(f"{arch}.pooling_type")
    layers, heads = num("block_count"), num("attention.head_count", 1) or 1
    kv_heads = num("attention.head_count_kv", heads)
    head_dim = num("attention.key_length") or num("embedding_length") // heads
    return GgufFacts(
        arch=arch,
        pooling_type=None if pooling is None else int(pooling),
        window=num("context_length", 512),
        layers=layers,
        classifier=any(n.startswith("cls.output") for n in names),
        classifier_dense=any(n.startswith("cls.weight") for n in names),
        kv_bytes_per_token=layers * 2 * kv_heads * head_dim * 2,
    )


def _header(gguf: Path) -> tuple[dict[str, Any], list[str]]:
    """A GGUF's scalar and string metadata (arrays skipped) and its tensors' names."""
    with open(gguf, "rb", buffering=1 << 16) as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) < size:
                raise ValueError("the file ends inside its header")
            return struct.unpack("<" + fmt, data)[0]

        def text() -> str:
            n = read("Q")
            if n > 1 << 24:
                raise ValueError("a string longer than 16 MiB in the header")
            data = f.read(n)
            if len(data) < n:
                raise ValueError("the file ends inside its header")
            return data.decode("utf-8")

        def value(kind: int) -> Any:
            if kind in _SCALARS:
                return read(_SCALARS[kind])
            if kind == 8:
                return text()
            if kind == 9:
                inner, count = read("I"), read("Q")  # skipped: no decision reads an array
                if inner in _SCALARS:
                    f.seek(count * struct.calcsize(_SCALARS[inner]), io.SEEK_CUR)
                else:
                    for _ in range(count):
                        value(inner)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version = read("I")
        if not 2 <= version <= 3:
            raise ValueError(
                f"GGUF version {version} (this reader knows 2 and 3; big-endian files are not read)"
            )
        tensors, kvs = read("Q"), read("Q")
        meta = {}
        for _ in range(kvs):
            key = text()
            meta[key] = value(read("I"))
        names = []
        for _ in range(tensors):
            names.append(text())
            dims = read("I")
            f.seek(8 * dims + 4 + 8, io.SEEK_CUR)  # the shape, the type, the data offset
        return meta, names


@dataclass(frozen=True)
class Offload:
    layers: int  # what llama.cpp is given: -1 all, 0 none
    device: str  # where the model runs, for `ps` and /api/ps
    reason: str


def supports_gpu() -> bool:
    return llamacpp_offloads()


def layers_that_fit(layers: int, file_bytes: int, kv_bytes: int, free_gib: float) -> int:
    """How many repeating layers fit in `free_gib` beside GPU_RESERVE_GIB: -1 for all of them
    (the output layer too), else a count. A layer is its share of the weights (the file less
    one layer's worth for embeddings and output) and of the KV cache."""
    per_layer = file_bytes / (layers + 1) + kv_bytes / max(layers, 1)
    room = (free_gib - GPU_RESERVE_GIB) * 2**30
    if room >= per_layer * (layers + 1):
        return -1
    return max(0, min(layers, int(room // per_layer)))


def free_gpu_gib() -> tuple[float | None, str]:
    """Free GPU memory in GiB and the GPU's kind: NVIDIA from NVML/nvidia-smi (all cards: llama.cpp
    splits layers across them), a Mac's share of RAM for Metal; None where it cannot be read."""
    from llmhost.hardware import METAL_SHARE, apple_silicon, memory_gib, nvidia_report

    report = nvidia_report()
    if report.gpus:
        free = sum(g.memory_total_mib - g.memory_used_mib for g in report.gpus) / 1024
        return free, "cuda"
    if apple_silicon():
        total, available = memory_gib()
        return min(available, total * METAL_SHARE), "metal"
    return None, "gpu"


def plan(settings: LoadSettings, facts: GgufFacts, gguf: Path) -> Offload:
    """The layers to give the GPU for this load: --n-gpu-layers, or the auto rule above."""
    wanted = settings.n_gpu_layers
    on_cpu = settings.device == "cpu"
    if wanted == 0 or (wanted is None and on_cpu):
        return Offload(0, "cpu", "--n-gpu-layers 0" if wanted == 0 else "--device cpu")
    if not supports_gpu():
        if wanted is not None:
            raise InvalidRequestError(
                f"--n-gpu-layers {wanted}: this llama-cpp-python is a CPU build, it cannot offload; "
                f"install a GPU build: {LLAMACPP_GPU_BUILD}"
            )
        return Offload(0, "cpu", "a CPU build of llama.cpp")
    free, kind = free_gpu_gib()
    if wanted is not None:
        layers = -1 if wanted < 0 or wanted > facts.layers else wanted
        return Offload(layers, _where(kind, layers, facts.layers), f"--n-gpu-layers {wanted}")
    if free is None:  # a GPU whose memory we cannot read (ROCm, Vulkan): llama.cpp's own errors decide
        return Offload(-1, _where(kind, -1, facts.layers), "all layers (free GPU memory unknown)")
    layers = layers_that_fit(facts.layers, gguf.stat().st_size, facts.kv_bytes(settings), free)
    return Offload(layers, _where(kind, layers, facts.layers), f"{free:.1f} GiB of GPU memory free")


def _where(kind: str, layers: int, total: int) -> str:
    if layers == 0:
        return "cpu"
    return kind if layers < 0 else f"{kind} ({layers}/{total} layers) + cpu"


def open_offloaded(gguf: Path, settings: LoadSettings, facts: GgufFacts, **options: Any) -> tuple[Any, str]:
    """llama-cpp-python's `Llama` for `gguf` with the weight repack decided and the layers the GPU
    takes (offload.py), and where the model runs. A load that fails on the GPU (its memory
    misread, a driver problem) is retried on the CPU, with a warning that says so."""
    decision = repack.decide(settings.weight_repack, gguf)
    where = plan(settings, facts, gguf)
    log.info("llama.cpp: %s (%s)", where.device, where.reason)
    ERRORS.install()
    ERRORS.lines.clear()
    try:
        return repack.open_model(gguf, bool(decision.use), n_gpu_layers=where.layers, **options), where.device
    except ValueError as err:
        if where.layers == 0 or settings.n_gpu_layers is not None:
            raise unloadable(gguf, err) from None
    log.warning("llama.cpp could not load %s with %s: it runs on the CPU instead", gguf.name, where.device)
    try:
        return repack.open_model(gguf, bool(decision.use), n_gpu_layers=0, **options), "cpu"
    except ValueError as err:
        raise unloadable(gguf, err) from None


def unloadable(gguf: Path, err: ValueError) -> LlmhostError:
    """What to say when llama.cpp refuses a file (llama-cpp-python says only "Failed to load
    model from file"): a damaged file raises GGUFReadError here, which the caller words; otherwise
    llama.cpp's own reason from its log, and what to do about it."""
    from llmhost.engine.backends.gguf import check_readable

    check_readable(gguf)
    reason = ERRORS.reason()
    if reason is None:
        return LlmhostError(
            f"llama.cpp could not load {gguf} ({err}); the file reads fine, so its architecture may be "
            "newer than this llama.cpp: upgrade llama-cpp-python, or try --engine transformers"
        )
    if "unknown model architecture" in reason:
        fix = "this llama.cpp is older than the model: upgrade llama-cpp-python, or try --engine transformers"
    elif "alloc" in reason or "memory" in reason:
        fix = "not enough memory: lower --context-length or --n-gpu-layers, or pick a smaller quantization"
    else:
        fix = "the file reads fine: upgrade llama-cpp-python, or try --engine transformers"
    return LlmhostError(f"llama.cpp could not load {gguf}: {reason}; {fix}")
