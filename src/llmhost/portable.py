"""Every call that differs between Linux, macOS and Windows, each with a fallback for the others.

The rest of llmhost calls these and nothing OS-specific: ruff's banned-API rule (TID251, see
pyproject.toml) stops `fcntl`, `os.kill`, `os.killpg`, `resource` and `signal.SIGKILL` elsewhere,
and tests/test_layout.py stops `/proc` paths and `prctl`. Tests force each fallback by
monkeypatching `IS_LINUX` / `IS_WINDOWS`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

IS_LINUX = sys.platform.startswith("linux")
IS_WINDOWS = sys.platform == "win32"

#: how long a rename that Windows refuses (a reader holds the file or folder open) is retried
REPLACE_RETRY_S = 5.0


class Busy(Exception):
    """The lock is held by another process."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool) -> Iterator[None]:
    """An exclusive lock between processes on `path` (flock on POSIX, LockFileEx on Windows,
    through `filelock`); `Busy` at once when another holds it and `wait` is false."""
    import filelock

    lock = filelock.FileLock(str(path), timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise Busy(str(path)) from None
    try:
        yield
    finally:
        lock.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (never signals it: `os.kill(pid, 0)` on Windows
    terminates the process)."""
    import psutil

    return psutil.pid_exists(pid)


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk. Windows' fsync (`_commit`) needs a handle open for
    writing; POSIX also flushes the folder's entry."""
    with open(path, "r+b" if IS_WINDOWS else "rb") as fh:
        os.fsync(fh.fileno())


def replace(src: Path, dst: Path) -> None:
    """`os.replace`, retried for a while on Windows, where a file or folder another process
    (a server, a virus scanner) holds open cannot be renamed until it lets go."""
    deadline = time.monotonic() + REPLACE_RETRY_S
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not IS_WINDOWS:
                raise
            if time.monotonic() > deadline:
                from llmhost.errors import LlmhostError

                raise LlmhostError(
                    f"cannot move {src} to {dst}: another program holds it open (a running llmhost "
                    "server, an editor, a virus scan); stop it and try again"
                ) from None
            time.sleep(0.1)


def memory_gib() -> tuple[float, float]:
    """(total, available) RAM in GiB on any OS (0, 0 where unknown)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
    except Exception:
        return 0.0, 0.0
    return vm.total / 2**30, vm.available / 2**30


def cpuinfo_text() -> str:
    """Linux's /proc/cpuinfo (the CPU's model and feature flags); empty elsewhere, where the
    model comes from `platform.processor()` and no flag is known."""
    if not IS_LINUX:
        return ""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def mapped_files() -> list[tuple[int, int, str, Path]]:
    """This process's memory mappings (start, end, permissions, file) on Linux; empty elsewhere."""
    if not IS_LINUX:
        return []
    found = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6:
                start, _, end = fields[0].partition("-")
                found.append((int(start, 16), int(end, 16), fields[1], Path(fields[5])))
    return found


def trim_malloc() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim; a no-op elsewhere)."""
    if IS_LINUX:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- children that do not outlive llmhost --------------------------------------------------

#: A child started with this variable watches that process id and exits when it is gone
#: (`watch_parent`): where no death signal exists (macOS, Windows)
PARENT_ENV = "LLMHOST_PARENT_PID"


def _death_signal() -> None:  # runs in the child between fork and exec (Linux)
    # SIGKILL, not SIGTERM: with the launcher gone their output pipe is broken, and a page seen
    # once kept running after a SIGTERM death signal (its shutdown depends on printing)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def child_options(group: bool, tied: bool, env: dict[str, str] | None) -> dict[str, Any]:
    """`subprocess.Popen` options for a child in a process group of its own (`group`) that dies
    with this process (`tied`): on Linux the kernel's death signal (it also covers a crash of
    ours), elsewhere the child's own watchdog thread (`watch_parent`), told our pid in PARENT_ENV."""
    kw: dict[str, Any] = {}
    if group:
        if IS_WINDOWS:
            kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kw["start_new_session"] = True
    if tied and IS_LINUX:
        kw["preexec_fn"] = _death_signal
    elif tied:
        env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
    if env is not None:
        kw["env"] = env
    return kw


def watch_parent(poll_s: float = 1.0) -> None:
    """In a child started with `child_options(tied=True)` off Linux: exit as soon as the
    process that started it is gone (a daemon thread polls it). Does nothing otherwise."""
    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return
    import psutil

    try:
        parent = psutil.Process(int(value))
        born = parent.create_time()
    except psutil.Error:
        os._exit(1)  # gone before we started

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                alive = parent.is_running() and parent.create_time() == born  # not a reused pid
            except psutil.Error:
                alive = False
            if not alive:
                os._exit(1)

    threading.Thread(target=watch, name="llmhost-parent-watch", daemon=True).start()


def group_killer(proc: subprocess.Popen) -> Callable[[], None]:
    """A function that kills what is left of a child's process group (POSIX) or, on Windows,
    of its process tree as it is now (taken before the child is asked to stop: once it is gone
    its children can no longer be found)."""
    if not IS_WINDOWS:

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        return kill
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []

    def kill_tree() -> None:
        for child in tree:
            with contextlib.suppress(psutil.Error):
                child.kill()

    return kill_tree
