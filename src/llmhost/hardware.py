"""Facts about this machine that decide dtype and device. Cheap, no torch import at module level."""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from llmhost import portable


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def torch_threads() -> int:
    """torch's own default for its intra-op threads: OMP_NUM_THREADS, else the physical cores."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says of the first CPU: its model name and feature flags."""

    model: str
    flags: frozenset[str]

    @property
    def amx(self) -> bool:
        """Whether the CPU advertises Intel AMX tiles (Sapphire Rapids and later). Some virtual
        machines advertise them while the tile instructions fault: see store/probes.py."""
        return "amx_tile" in self.flags


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first CPU's entry of a /proc/cpuinfo text (x86 `model name`/`flags`; Arm `Features`)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif not line.strip() and (model or flags):
            break  # the end of the first CPU's entry
    return CpuInfo(model or platform.processor() or platform.machine(), flags)


@functools.cache
def cpu_info() -> CpuInfo:
    return parse_cpuinfo(portable.cpuinfo_text())


def cpu_flags() -> frozenset[str]:
    return cpu_info().flags


#: share of a Mac's unified memory Metal lets the GPU take (its recommendedMaxWorkingSetSize is
#: about two thirds to three quarters of the RAM)
METAL_SHARE = 0.65


def apple_silicon() -> bool:
    """A Mac with an M-series chip: one unified memory for the CPU and its GPU (Metal, MPS)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def cpu_supports_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU has native bf16 math (AVX-512 BF16 or AMX); elsewhere bf16 is emulated
    and slower than float32. Apple silicon also computes bf16 natively."""
    if apple_silicon():
        return True
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():  # NVIDIA, and AMD through ROCm builds of torch
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():  # Apple silicon's GPU (Metal)
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> str:
    """The dtype name for `requested` ("auto" or an explicit name) on `device`."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


# --- NVIDIA GPUs: NVML when nvidia-ml-py is installed, else the text nvidia-smi prints ------------


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int


@dataclass(frozen=True)
class NvidiaReport:
    driver_version: str | None = None
    cuda_version: str | None = None
    """The highest CUDA version the driver supports (not the toolkit installed)."""
    gpus: tuple[Gpu, ...] = ()
    problem: str | None = None
    """Why no GPU could be read: no nvidia-smi, or a driver that does not answer."""
    via: str = "nvidia-smi"


_HEADER = re.compile(r"Driver Version:\s*([\d.]+)\s+CUDA Version:\s*([\d.]+)")
_GPU_ROW = re.compile(r"^\|\s+(\d+)\s+(.+?)\s*\|\s*[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d")
_MEMORY = re.compile(r"(\d+)MiB\s*/\s*(\d+)MiB")
_NAME_TAIL = re.compile(r"\s+(On|Off|WDDM|TCC|N/A)$")


def parse_nvidia_smi(text: str) -> NvidiaReport:
    """The default `nvidia-smi` table, as printed on Linux and Windows drivers."""
    header = _HEADER.search(text)
    if header is None:
        first = text.strip().splitlines()[0] if text.strip() else "no output"
        return NvidiaReport(problem=f"nvidia-smi did not report a driver: {first}")
    gpus: list[Gpu] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        row = _GPU_ROW.match(line)
        if not row:
            continue
        name = row.group(2)
        while (tail := _NAME_TAIL.search(name)) is not None:
            name = name[: tail.start()]
        memory = next((m for nxt in lines[i + 1 : i + 3] if (m := _MEMORY.search(nxt))), None)
        used, total = (int(memory.group(1)), int(memory.group(2))) if memory else (0, 0)
        gpus.append(Gpu(int(row.group(1)), name.strip(), total, used))
    return NvidiaReport(header.group(1), header.group(2), tuple(gpus))


def nvidia_report() -> NvidiaReport:
    """Read the GPUs of this machine (NVML first, nvidia-smi second); never raises."""
    try:
        return _nvml_report()
    except Exception:  # nvidia-ml-py missing or no driver: fall back to the command
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return NvidiaReport(problem="no NVIDIA driver found (nvidia-smi is not installed)")
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return NvidiaReport(problem=f"nvidia-smi failed: {err}")
    return parse_nvidia_smi(out.stdout + out.stderr)


def _nvml_report() -> NvidiaReport:
    import pynvml  # from nvidia-ml-py

    pynvml.nvmlInit()
    try:
        version = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 12020
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(Gpu(i, name, mem.total // 2**20, mem.used // 2**20))
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        return NvidiaReport(driver, f"{version // 1000}.{version % 1000 // 10}", tuple(gpus), via="NVML")
    finally:
        pynvml.nvmlShutdown()


def memory_gib() -> tuple[float, float]:
    """(total, available) RAM in GiB (0, 0 where unknown)."""
    return portable.memory_gib()


# -- memory, as the server's model pool measures it ----------------------------------------


def _cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def free_gib(device: str) -> float:
    """Memory free now for models on `device`: GPU memory for a GPU (or `auto` with one), else RAM."""
    import psutil

    if device.startswith("cuda") or (device == "auto" and _cuda()):
        import torch

        return torch.cuda.mem_get_info()[0] / 2**30
    return psutil.virtual_memory().available / 2**30


def used_bytes() -> int:
    """This process's resident memory plus the CUDA memory torch holds."""
    import psutil

    used = psutil.Process().memory_info().rss
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        used += torch.cuda.memory_allocated()
    return used


def give_memory_back() -> None:
    """After unloading: collect the engine's objects and return freed pages to the system."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    portable.trim_malloc()
