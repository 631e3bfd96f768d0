"""`llmhost doctor`: this machine's facts and a verdict (pure functions over the facts, so every
branch is tested with real nvidia-smi outputs)."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from llmhost.hardware import METAL_SHARE, Gpu, NvidiaReport, apple_silicon, memory_gib
from llmhost.store.catalog import CatalogEntry, catalog
from llmhost.store.estimate import estimate, shape_of

TORCH_INDEX = "https://download.pytorch.org/whl"
CURRENT_TORCH = "2.13.0"
LEGACY_TORCH = "2.7.1"  # the last release with CUDA 11.8 wheels


@dataclass(frozen=True)
class TorchFacts:
    version: str | None
    cuda: str | None
    """CUDA version the installed torch was built for; None for a CPU build."""
    cuda_available: bool = False
    hip: str | None = None
    """ROCm version of an AMD build of torch (its GPUs answer torch.cuda)."""
    mps: bool = False
    """Whether torch reaches Apple silicon's GPU (Metal Performance Shaders)."""
    gpus: tuple[Gpu, ...] = ()
    """GPUs torch sees where NVML cannot (AMD, through ROCm)."""


@dataclass(frozen=True)
class TorchAdvice:
    ok: bool
    message: str
    command: str | None = None


def _v(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def wheel_for_driver(driver_cuda: str) -> tuple[str, str] | None:
    """(torch version, wheel tag) that runs on a driver supporting `driver_cuda`. CUDA 12.x wheels
    run on any 12.x driver (minor version compatibility); 13.x needs a 13.x driver."""
    v = _v(driver_cuda)
    if v >= (13, 0):
        return CURRENT_TORCH, "cu130"
    if v >= (12, 8):
        return CURRENT_TORCH, "cu128"
    if v >= (12, 0):
        return CURRENT_TORCH, "cu126"
    if v >= (11, 8):
        return LEGACY_TORCH, "cu118"
    return None


def torch_advice(nvidia: NvidiaReport, torch: TorchFacts, apple: bool = False) -> TorchAdvice:
    if apple:
        if torch.version is None:
            return TorchAdvice(False, "torch is not installed", f"pip install torch=={CURRENT_TORCH}")
        if not torch.mps:
            return TorchAdvice(
                False, f"torch {torch.version} does not reach the Apple GPU (MPS): reinstall the arm64 build",
                f"pip install --force-reinstall torch=={CURRENT_TORCH}",
            )  # fmt: skip
        return TorchAdvice(True, f"torch {torch.version} runs on the Apple GPU (MPS); GGUF models on Metal")
    if torch.hip:
        if torch.gpus:
            return TorchAdvice(True, f"torch {torch.version} (ROCm {torch.hip}) runs on the AMD GPU")
        return TorchAdvice(
            False, f"torch {torch.version} is a ROCm build but sees no AMD GPU: check the ROCm driver"
        )
    if not nvidia.gpus:
        if torch.version is None:
            return TorchAdvice(False, "torch is not installed", f"pip install torch=={CURRENT_TORCH}")
        if nvidia.problem and "communicate" in nvidia.problem:
            return TorchAdvice(
                False, "an NVIDIA driver is installed but does not answer: reinstall or update the "
                "driver, then reboot; until then llmhost runs on the CPU",
            )  # fmt: skip
        return TorchAdvice(True, "no NVIDIA GPU: llmhost runs on the CPU")
    assert nvidia.cuda_version is not None
    wheel = wheel_for_driver(nvidia.cuda_version)
    if wheel is None:
        return TorchAdvice(
            False,
            f"the driver supports CUDA {nvidia.cuda_version} only; current PyTorch needs 11.8 or newer: "
            "update the NVIDIA driver",
        )
    version, tag = wheel
    command = f"pip install torch=={version} --index-url {TORCH_INDEX}/{tag}"
    if torch.version is None:
        return TorchAdvice(False, "torch is not installed", command)
    if torch.cuda is None:
        return TorchAdvice(False, f"torch {torch.version} is a CPU build, so the GPU is unused", command)
    if _v(torch.cuda)[0] > _v(nvidia.cuda_version)[0] or (
        _v(torch.cuda)[0] < 12 and _v(torch.cuda) > _v(nvidia.cuda_version)
    ):
        return TorchAdvice(
            False,
            f"torch {torch.version} is built for CUDA {torch.cuda} but the driver supports up to "
            f"{nvidia.cuda_version}",
            command,
        )
    return TorchAdvice(
        True, f"torch {torch.version} (CUDA {torch.cuda}) runs on this driver (CUDA {nvidia.cuda_version})"
    )


@dataclass(frozen=True)
class Fit:
    model: str
    dtype: str
    need_gib: float
    room_gib: float
    """Memory left over after the model (negative: it does not fit)."""


def dtype_options(entry: CatalogEntry, gpu: bool) -> tuple[str, ...]:
    """Best first: 16-bit weights, then 8-bit, then 4-bit (GGUF where the catalog has one)."""
    four_bit = "q4_k_m" if entry.gguf else "int4"
    if gpu:
        return ("bfloat16", "int8", four_bit)
    return ("bfloat16", "q4_k_m") if entry.gguf else ("bfloat16",)


def fits(entries: list[CatalogEntry], budget_gib: float, gpu: bool, context: int) -> list[Fit]:
    """For each model, the best dtype that fits `budget_gib`, or its smallest need if none does.
    16-bit weights with the 8-bit KV cache (`--kv-cache q8_0`, which halves the cache) come right
    after 16-bit weights alone: a long context costs less quality that way than in 8- or 4-bit
    weights; last of all a GGUF with it."""
    result = []
    for entry in entries:
        shape = shape_of(entry)
        options = [estimate(shape, d, context, gpu) for d in dtype_options(entry, gpu)]
        options.insert(1, estimate(shape, "bfloat16", context, gpu, kv_cache="q8_0"))
        if entry.gguf:
            options.append(estimate(shape, "q4_k_m", context, gpu, kv_cache="q8_0"))
        best = next((o for o in options if o.total_gib <= budget_gib), options[-1])
        need = round(best.total_gib, 2)
        label = (
            best.dtype if best.kv_cache in ("f16", "float32") else f"{best.dtype} --kv-cache {best.kv_cache}"
        )
        result.append(Fit(entry.name, label, need, round(budget_gib - best.total_gib, 2)))
    return result


def recommend(fit_list: list[Fit], gpu: bool) -> str | None:
    """The largest current model that fits (none that needs remote code or has a successor in the
    catalog, such as the tutorial's Qwen-1); on a CPU, at most ~3B (speed)."""
    entries = catalog()
    good = [
        f for f in fit_list
        if f.room_gib >= 0 and not entries[f.model].remote_code and not entries[f.model].successor
        and (gpu or entries[f.model].params_b <= 3.5)
    ]  # fmt: skip
    if not good:
        return None
    full = [f for f in good if f.dtype == "bfloat16"] or good
    return max(full, key=lambda f: entries[f.model].params_b).model


@dataclass
class Report:
    os: str
    python: str
    torch: TorchFacts
    nvidia: NvidiaReport
    ram_total_gib: float
    ram_available_gib: float
    disk_free_gib: float
    store: str
    advice: TorchAdvice
    context: int
    gpu_kind: str = "none"
    """What computes besides the CPU: NVIDIA (CUDA), AMD (ROCm), Apple silicon (Metal), none."""
    fits: list[Fit] = field(default_factory=list)
    recommendation: str | None = None
    on_gpu: bool = False
    engines: dict[str, str] = field(default_factory=dict)
    """Engine → what is installed, or how to install it."""
    cpu: str = ""
    repack: str | None = None
    """llama.cpp's weight repack on this CPU, and why (None: llama.cpp is not installed)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(nvidia: NvidiaReport, torch: TorchFacts, store_dir: Any, context: int = 4096) -> Report:
    total, available = memory_gib()
    store_dir.mkdir(parents=True, exist_ok=True)
    entries = list(catalog().values())
    apple = apple_silicon()
    cards = nvidia.gpus or torch.gpus
    on_gpu = bool(cards) or apple
    if cards:  # the largest card with 5% spare
        budget = max(g.memory_total_mib for g in cards) / 1024 * 0.95
        kind = "NVIDIA (CUDA)" if nvidia.gpus else f"AMD (ROCm {torch.hip})"
    elif apple:  # the share of the unified memory Metal gives the GPU
        budget, kind = total * METAL_SHARE, "Apple silicon (Metal, unified memory)"
    else:  # 80% of free RAM, leaving room for the OS and the page
        budget, kind = available * 0.8, "none"
    fit_list = fits(entries, budget, on_gpu, context)
    return Report(
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        python=sys.version.split()[0],
        torch=torch,
        nvidia=nvidia,
        ram_total_gib=round(total, 1),
        ram_available_gib=round(available, 1),
        disk_free_gib=round(shutil.disk_usage(store_dir).free / 2**30, 1),
        store=str(store_dir),
        advice=torch_advice(nvidia, torch, apple),
        gpu_kind=kind,
        context=context,
        fits=fit_list,
        recommendation=recommend(fit_list, on_gpu),
        on_gpu=on_gpu,
        engines=engines(on_gpu),
        cpu=_cpu(),
        repack=_repack(),
    )


def _cpu() -> str:
    from llmhost.hardware import cpu_info, physical_cores

    cpu = cpu_info()
    return f"{cpu.model}, {physical_cores()} cores" + (", AMX" if cpu.amx else "")


def _repack() -> str | None:
    """What a llama.cpp load decides now (store/probes.py), with the LLMHOST_WEIGHT_REPACK setting."""
    from llmhost.config import LoadSettings
    from llmhost.store.probes import llama_cpp_version, repack_decision

    if llama_cpp_version() is None:
        return None
    from pydantic import ValidationError

    try:
        setting = LoadSettings().weight_repack
    except ValidationError as err:  # a bad LLMHOST_* variable: say so instead of failing
        return f"unknown: an LLMHOST_* setting is invalid ({err.errors()[0]['loc'][0]})"
    decision = repack_decision(setting)
    state = "decided at the first load" if decision.use is None else "on" if decision.use else "off"
    return f"{state}: {decision.reason}"


def engines(gpu: bool = False) -> dict[str, str]:
    """Which engines can run here (package versions, read without importing them), and whether
    llama.cpp's build can use a GPU this machine has."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    found = {
        "transformers": installed("transformers"),
        "llamacpp": installed("llama-cpp-python"),
        "openai": installed("openai"),
    }
    hints = {
        "transformers": "missing: pip install transformers",
        "llamacpp": "not installed: pip install 'llmhost[llamacpp]' (then --engine llamacpp)",
        "openai": "missing: pip install openai",
    }
    report = {name: f"{ver} installed" if ver else hints[name] for name, ver in found.items()}
    if found["llamacpp"] and gpu:
        report["llamacpp"] += f" ({_llamacpp_build()})"
    report["vllm"] = _vllm()
    return report


def _llamacpp_build() -> str:
    from llmhost.installs import LLAMACPP_GPU_BUILD, llamacpp_offloads

    try:
        offloads = llamacpp_offloads()
    except Exception as err:  # a binding that does not load: the engine says why at its first load
        return f"cannot load: {type(err).__name__}"
    return (
        "GPU build: layers go to the GPU" if offloads else f"CPU build, the GPU unused: {LLAMACPP_GPU_BUILD}"
    )


def _vllm() -> str:
    import os
    from pathlib import Path

    from llmhost.installs import VLLM_INSTALL, find_vllm

    given = os.environ.get("LLMHOST_VLLM_PYTHON")
    install = find_vllm(Path(given) if given else None)
    if install is None:
        return f"not found: {VLLM_INSTALL}"
    return f"{install.dist} {install.version} installed (python: {install.python})"


def torch_facts() -> TorchFacts:
    try:
        import torch
    except ImportError:
        return TorchFacts(None, None)
    hip = getattr(torch.version, "hip", None)
    cuda_ok = bool(torch.cuda.is_available())
    gpus: tuple[Gpu, ...] = ()
    if hip and cuda_ok:  # AMD cards, which NVML does not see
        found = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            found.append(Gpu(i, torch.cuda.get_device_name(i), total // 2**20, (total - free) // 2**20))
        gpus = tuple(found)
    mps = getattr(torch.backends, "mps", None)
    return TorchFacts(
        torch.__version__, torch.version.cuda, cuda_ok, hip, bool(mps and mps.is_available()), gpus
    )
