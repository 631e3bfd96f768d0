"""llama.cpp's weight repacking (ggml's extra buffer types), used where it is safe.

At load, ggml may copy a GGUF's weights into layouts for its fastest CPU kernels (AVX2/AVX-512
interleavings, AMX tiles). On a CPU that advertises AMX, some virtual machines fault at the first
tile instruction and the whole process dies (SIGSEGV/SIGILL): no Python code can catch that. So
there the first load asks a child process: it loads a model with the repack on, evaluates a
batch and decodes a step, and exits; a crash there costs nothing but the answer, which is kept
per llama-cpp-python version and CPU (store/probes.py) so later loads take no time.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost import portable
from llmhost.config import Repack
from llmhost.hardware import cpu_info, physical_cores
from llmhost.store.probes import (
    RepackDecision,
    Verdicts,
    llama_cpp_version,
    repack_decision,
    repack_key,
)

log = logging.getLogger("llmhost.llamacpp")

#: A probe that has not finished by then is taken as hung: the repack stays off here.
PROBE_TIMEOUT_S = 300.0
_OK = "llmhost-probe: ok"
_SETUP = 3  # the child's exit code when it could not even try (no binding, unreadable file)
_lock = threading.Lock()


def decide(setting: Repack, model: Path) -> RepackDecision:
    """Whether this load repacks weights: the setting, else what is known of this CPU, else a
    probe in a child process on `model` (the embedded model where installed: small, and Q4_1,
    which AMX repacks), whose verdict is kept."""
    decision = repack_decision(setting)
    if decision.use is None:
        decision = probe(_probe_model(model))
    log.info("llama.cpp weight repack: %s (%s)", "on" if decision.use else "off", decision.reason)
    return decision


def _probe_model(model: Path) -> Path:
    from llmhost.errors import LlmhostError
    from llmhost.store.embedded import embedded_gguf

    try:
        return embedded_gguf(fetch=False)[0]  # never a download for a probe
    except LlmhostError:
        return model


def _child_command(model: Path) -> list[str]:
    return [sys.executable, "-c", f"from {__name__} import _child; _child()", str(model)]


def probe(model: Path, timeout: float = PROBE_TIMEOUT_S, child: list[str] | None = None) -> RepackDecision:
    """Run the repack on `model` in a child process; keep and return the verdict. `child` is
    the command (default: this module's `_child` under this Python)."""
    cmd = child or _child_command(model)
    started = time.monotonic()
    log.info("llama.cpp: probing once whether repacked weights run on this CPU (%s)", cpu_info().model)
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            **portable.child_options(group=False, tied=True, env=None),
        )
    except subprocess.TimeoutExpired:
        return _keep(False, f"the probe did not finish within {timeout:g} s")
    except OSError as err:
        return RepackDecision(False, f"the probe could not start ({err}): repack off for this load")
    took = time.monotonic() - started
    code = out.returncode
    if code == 0 and _OK in out.stdout:
        buffers = [
            line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("buffer:")
        ]
        return _keep(True, f"repacked {', '.join(buffers) or 'nothing'}; {took:.1f} s", buffers)
    if code == _SETUP:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return RepackDecision(False, f"the probe could not run ({last}): repack off for this load")
    return _keep(False, f"the probe {_death(code)}")


def _keep(works: bool, detail: str, buffers: list[str] | None = None) -> RepackDecision:
    verdict = {"works": works, "detail": detail, "buffers": buffers or []}
    Verdicts().put(repack_key(llama_cpp_version() or "?", cpu_info()), verdict)
    return RepackDecision(works, f"probed now: {detail}")


def _death(code: int) -> str:
    """How a child ended, in words (a signal on POSIX, an NTSTATUS on Windows)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}" if code < 256 else f"crashed (0x{code & 0xFFFFFFFF:08X})"


@contextlib.contextmanager
def _model_defaults(**fields: Any) -> Iterator[None]:
    """llama-cpp-python's `Llama` takes no `use_extra_bufts`: for one constructor call, the
    binding's default model parameters come with these fields set (a lock keeps other loads
    from seeing them)."""
    import llama_cpp.llama_cpp as binding

    real = binding.llama_model_default_params

    def defaults() -> Any:
        params = real()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    with _lock:
        binding.llama_model_default_params = defaults
        try:
            yield
        finally:
            binding.llama_model_default_params = real


def open_model(gguf: Path, repack: bool, **options: Any) -> Any:
    """llama-cpp-python's `Llama` for `gguf`, with the repack on or off: by default its model,
    tokenizer and metadata with a minimal context of its own (`options` are Llama's)."""
    from llama_cpp import Llama

    kw = {"n_ctx": 64, "n_batch": 64, "n_threads": physical_cores(), "verbose": False, **options}
    with _model_defaults(use_extra_bufts=repack):
        llm = Llama(model_path=str(gguf), **kw)
    if bool(llm.model_params.use_extra_bufts) != repack:  # a binding that builds its parameters otherwise
        log.warning(
            "llama.cpp: could not set the weight repack %s on this binding", "on" if repack else "off"
        )
    return llm


def _child() -> None:
    """The probe, in its own process: load with the repack on (llama.cpp says on stderr which
    buffers it repacked into), evaluate a batch, decode a step. A fault kills only this process."""
    import os
    import tempfile

    path = Path(sys.argv[-1])
    portable.watch_parent()
    try:
        import llama_cpp  # noqa: F401

        # llama.cpp's load log goes to the C stderr: into a nameless file we read back
        saved = os.dup(2)
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                llm = open_model(path, True, verbose=True)
            finally:
                os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
    except Exception as err:  # no binding, an unreadable file: nothing learned about the CPU
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(_SETUP)
    for line in text.splitlines():
        if "model buffer size" in line and "CPU_Mapped" not in line and " CPU model" not in line:
            print("buffer:", line.split(":", 1)[-1].split("model buffer")[0].strip(), flush=True)
    ids = [(i * 7919) % (llm.n_vocab() - 256) + 128 for i in range(40)]
    llm.eval(ids)  # one batch: the repacked matmuls' GEMM path
    llm.eval([ids[0]])  # one step: their GEMV path
    print(_OK, flush=True)
