"""What this machine was measured to do, decided once and kept in llmhost's home, so a later load
takes no time: today, whether llama.cpp's repacked weights (ggml's "extra buffer types") run on
this CPU.

ggml repacks a GGUF's weights at load into layouts for its fastest kernels: AVX2/AVX-512
interleavings of Q4_0 and IQ4_NL, and on Intel CPUs with AMX (Sapphire Rapids and later) tiles
for the AMX int8 unit. Some virtual machines advertise AMX in /proc/cpuinfo while the tile
instructions fault (`ldtilecfg`): llama.cpp then dies at the first multiplication, and so did
llama-server (`--no-repack` runs). So where the CPU advertises AMX, a child process loads a
model with the repack on and decodes a batch and a step; its exit says whether the repack is safe
here, remembered per llama-cpp-python version and CPU. The pure decision (`decide_repack`) is
tested on recorded /proc/cpuinfo texts; `llmhost doctor` shows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmhost import portable
from llmhost.config import Repack, llmhost_home
from llmhost.hardware import CpuInfo

FILE = "probes.json"


@dataclass(frozen=True)
class RepackDecision:
    use: bool | None
    """Whether llama.cpp may repack weights; None: only a probe in a child process can tell."""
    reason: str


def repack_key(llama_version: str, cpu: CpuInfo) -> str:
    """What a verdict depends on: the llama.cpp build and the CPU (its model and its flags, which
    a hypervisor may change for the same model)."""
    flags = hashlib.sha256(" ".join(sorted(cpu.flags)).encode()).hexdigest()[:12]
    return f"repack|llama-cpp-python {llama_version}|{cpu.model}|{flags}"


def decide_repack(setting: Repack, cpu: CpuInfo, verdict: dict[str, Any] | None) -> RepackDecision:
    """Whether llama.cpp repacks weights here: the setting, else what is known of this CPU."""
    if setting != "auto":
        return RepackDecision(setting == "on", f"--weight-repack {setting}")
    if not cpu.amx:
        return RepackDecision(True, "no AMX on this CPU: the repacked kernels are AVX ones the CPU runs")
    if verdict is not None:
        when = time.strftime("%Y-%m-%d", time.localtime(verdict.get("at", 0)))
        if verdict.get("works"):
            return RepackDecision(True, f"AMX works here (probed {when})")
        return RepackDecision(
            False, f"AMX faults on this machine (probed {when}: {verdict.get('detail', 'the probe failed')})"
        )
    return RepackDecision(None, "this CPU advertises AMX: probed once, in a child process, at the first load")


class Verdicts:
    """The probes' verdicts, one JSON file in llmhost's home; written whole and atomically (a
    crash mid-write leaves the old file), unreadable content counts as nothing known."""

    def __init__(self, home: Path | None = None) -> None:
        self.path = (home or llmhost_home()) / FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        value = self._read().get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, verdict: dict[str, Any]) -> None:
        data = self._read()
        data[key] = {**verdict, "at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            portable.replace(tmp, self.path)
        except OSError:  # a read-only home: the probe runs again next time, nothing breaks
            with contextlib.suppress(OSError):
                tmp.unlink()


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, read without importing it (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def repack_decision(setting: Repack) -> RepackDecision:
    """The decision for this machine from what is already known (no probe runs here)."""
    from llmhost.hardware import cpu_info

    cpu = cpu_info()
    return decide_repack(setting, cpu, Verdicts().get(repack_key(llama_cpp_version() or "?", cpu)))
