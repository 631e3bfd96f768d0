"""llama.cpp's CPU backend, reached under its context: the switch to ggml's reference kernels.

ggml's CPU backend computes flash attention three ways: in 64-query tiles for a prompt block of
64 rows or more, split across the threads over the KV cells for a single row past 512 cells (a
decode step alone), and one query row at a time otherwise. The three round differently, so a
reply's cells, decoded a token at a time, are not the cells a cold run of the next turn computes
(measured on the embedded model: logits off by up to 0.75). `ggml_backend_cpu_set_use_ref`
makes the backend take the row-at-a-time path for all of them (and skip its tiled K-quant
matmuls and op fusion); every position is then computed alike whatever batch it is in, and a
reply's cells can be reused exactly as decoded. llama.cpp keeps its backends to itself, so the
CPU one is found as llama.cpp hands it out: `llama_set_abort_callback` looks up the CPU
registry's `ggml_backend_set_abort_callback` and calls it with each backend of the context;
for that one call the registry's lookup answers with a function that records the backend.

Nothing here is required: on a build without these libraries or symbols (another backend, an
older ggml), or a registry that is not the CPU library's own static data, `cpu_backends` finds
none and the engine keeps its other exactness scheme, as it does with `--no-reference-kernels`
(LLMHOST_REFERENCE_KERNELS=0). The reference kernels are ggml's plain C loops: they use no
instruction the default kernels do not (no AMX: see repack.py).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

from llmhost import portable

log = logging.getLogger("llmhost.llamacpp")

#: struct ggml_backend_reg { int api_version; struct ggml_backend_reg_i iface; void * context; }
#: with iface = { get_name, get_device_count, get_device, get_proc_address }: the offset of the
#: last, after the int padded to a pointer's alignment; the layout of API version 2 (and 1)
_PROC_OFFSET = ctypes.sizeof(ctypes.c_void_p) * 4
_API_VERSIONS = (1, 2)
_PROC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_SET_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_lock = threading.Lock()


def _maps() -> list[tuple[int, int, str, Path]]:
    """The process's mappings (Linux; empty elsewhere, where the reference kernels stay off)."""
    return portable.mapped_files()


def _loaded(folder: Path, stem: str) -> str:
    """The file of a library the process has mapped from `folder` (Linux): a wheel installs
    libggml.so, .so.0 and .so.0.25.3 as copies, not links, and opening another copy than the
    one libllama loaded would give a second ggml with registries of its own."""
    for *_, path in _maps():
        if path.parent == folder and (path.name == f"{stem}.so" or path.name.startswith(f"{stem}.so.")):
            return str(path)
    raise OSError(f"{stem} is not loaded from {folder}")


def _writable_in(file: str, address: int, size: int) -> bool:
    """Whether [address, address + size) lies in a writable mapping of `file`: the registry's
    lookup slot is patched only where it is the CPU library's own static data."""
    return any(
        start <= address and address + size <= end and "w" in perms and str(path) == file
        for start, end, perms, path in _maps()
    )


class _Libs:
    """ggml's base and CPU libraries, the very ones the binding's libllama loaded."""

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as binding

        folder = Path(binding._lib._name).resolve().parent
        self.ggml = ctypes.CDLL(_loaded(folder, "libggml"))
        self.cpu_file = _loaded(folder, "libggml-cpu")
        self.cpu = ctypes.CDLL(self.cpu_file)
        self.ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        self.ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        self.cpu.ggml_backend_cpu_set_use_ref.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self.cpu.ggml_backend_cpu_set_abort_callback.argtypes = [ctypes.c_void_p] * 3
        self.cpu.ggml_backend_is_cpu.argtypes = [ctypes.c_void_p]
        self.cpu.ggml_backend_is_cpu.restype = ctypes.c_bool


_libs: _Libs | None = None
_unreachable = False  # tried once and failed: not tried (nor logged) again for every runner
#: the recording function and the lookup while it is installed: ctypes callbacks must outlive
#: every call into them, including one another thread began just before the lookup was restored
_keep: list[Any] = []


def _load() -> _Libs | None:
    global _libs, _unreachable
    if _libs is None and not _unreachable:
        try:
            _libs = _Libs()
        except (OSError, AttributeError, ImportError) as err:
            _unreachable = True
            log.info("llama.cpp's CPU backend cannot be reached (%s): its default kernels stay", err)
    return _libs


def cpu_backends(ctx: Any) -> list[int]:
    """The handles of a llama.cpp context's CPU backends (empty when they cannot be reached).
    Leaves the context with no abort callback."""
    import llama_cpp

    libs = _load()
    if libs is None:
        return []
    reg = libs.ggml.ggml_backend_reg_by_name(b"CPU")
    size = ctypes.sizeof(ctypes.c_void_p)
    if not reg or not _writable_in(libs.cpu_file, reg, _PROC_OFFSET + size):
        log.info("llama.cpp's CPU registry does not lie in its CPU library's data: its default kernels stay")
        return []
    if ctypes.c_int.from_address(reg).value not in _API_VERSIONS:
        log.info("llama.cpp's CPU registry is not one this llmhost knows: its default kernels stay")
        return []
    caller, found = threading.get_ident(), []

    def record(backend: int, callback: int, data: int) -> None:
        if threading.get_ident() == caller and libs.cpu.ggml_backend_is_cpu(backend):
            found.append(backend)
        libs.cpu.ggml_backend_cpu_set_abort_callback(backend, callback, data)

    recorder = _SET_ABORT(record)
    with _lock:
        slot = ctypes.c_void_p.from_address(reg + _PROC_OFFSET)
        original = slot.value
        lookup = _PROC(original)
        real = ctypes.cast(libs.cpu.ggml_backend_cpu_set_abort_callback, ctypes.c_void_p).value
        if not original or lookup(reg, b"ggml_backend_set_abort_callback") != real:
            log.info("llama.cpp's CPU registry is not laid out as expected: its default kernels stay")
            return []

        def proc(r: int, name: bytes) -> int | None:
            if name == b"ggml_backend_set_abort_callback":
                return ctypes.cast(recorder, ctypes.c_void_p).value
            return lookup(r, name)

        patched = _PROC(proc)
        _keep.extend((recorder, patched))
        slot.value = ctypes.cast(patched, ctypes.c_void_p).value
        try:
            llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)
        finally:
            slot.value = original
    return found


def set_reference(backends: list[int], on: bool) -> None:
    """Switch ggml's reference kernels on or off for these CPU backends (see the module notes)."""
    libs = _load()
    if libs is None:
        return
    for backend in backends:
        libs.cpu.ggml_backend_cpu_set_use_ref(backend, on)
