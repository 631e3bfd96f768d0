"""llmhost.portable: each OS-specific call and its fallback, the fallbacks forced by flipping the
module's OS flags (this suite runs on Linux; the real calls behind each branch run here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from llmhost import hardware, portable
from llmhost.errors import LlmhostError


@pytest.fixture
def not_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(portable, "IS_LINUX", False)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch, not_linux: None) -> None:
    monkeypatch.setattr(portable, "IS_WINDOWS", True)
    # the flag Windows' subprocess module has; POSIX's Popen refuses creationflags, so the test
    # checks the option rather than passing it
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)


def _python(code: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, **kw
    )


def test_file_lock_is_exclusive_between_processes(tmp_path: Path) -> None:
    lock = tmp_path / "model.lock"
    holder = _python(
        f"""
        from pathlib import Path
        from llmhost import portable
        with portable.file_lock(Path({str(lock)!r}), wait=False):
            print("held", flush=True)
            input()
        """,
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(portable.Busy), portable.file_lock(lock, wait=False):
        pass
    holder.communicate("\n", timeout=30)
    with portable.file_lock(lock, wait=False):  # free once the holder let go
        pass


def test_store_lock_says_what_to_do_when_busy(tmp_path: Path) -> None:
    from llmhost.store.local import Store

    store = Store(tmp_path)
    with store.lock("qwen"):
        with (
            pytest.raises(LlmhostError, match="another llmhost process is writing 'qwen'"),
            store.lock("qwen"),
        ):
            pass
        with store.lock("other"):  # one lock per model
            pass


def test_pid_alive() -> None:
    # through psutil (OpenProcess on Windows, where os.kill(pid, 0) would terminate the process)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert portable.pid_alive(os.getpid())
    assert not portable.pid_alive(gone.pid)


def test_stale_conversion_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from llmhost.engine.cached import TMP_PREFIX, _remove_stale_tmp

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{TMP_PREFIX}model-{gone.pid}"
    mine = tmp_path / f"{TMP_PREFIX}model-{os.getpid()}"
    dead.mkdir()
    mine.mkdir()
    _remove_stale_tmp(tmp_path)
    assert not dead.exists() and mine.exists()


@pytest.mark.parametrize("os_name", ["linux", "windows"])
def test_fsync_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, os_name: str) -> None:
    monkeypatch.setattr(portable, "IS_WINDOWS", os_name == "windows")
    modes = []
    real_open = open

    def spy(path: object, mode: str = "r", *a: object, **kw: object) -> object:
        modes.append(mode)
        return real_open(path, mode, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"weights")
    portable.fsync_file(file)
    assert modes[-1] == ("r+b" if os_name == "windows" else "rb")  # Windows' _commit needs write access
    assert file.read_bytes() == b"weights"


def test_replace_retries_while_windows_holds_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, windows: None
) -> None:
    src, dst = tmp_path / "staging", tmp_path / "model"
    src.mkdir()
    real, refusals = os.replace, [2]

    def held(a: Path, b: Path) -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise PermissionError(13, "The process cannot access the file")
        real(a, b)

    monkeypatch.setattr(os, "replace", held)
    portable.replace(src, dst)
    assert dst.is_dir() and not src.exists() and refusals == [0]


def test_replace_says_what_to_do_when_windows_never_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, windows: None
) -> None:
    def held(a: Path, b: Path) -> None:
        raise PermissionError(13, "The process cannot access the file")

    monkeypatch.setattr(os, "replace", held)
    monkeypatch.setattr(portable, "REPLACE_RETRY_S", 0.3)
    with pytest.raises(LlmhostError, match=r"another program holds it open.*stop it and try again"):
        portable.replace(tmp_path / "staging", tmp_path / "model")


def test_replace_does_not_retry_on_posix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refused(a: Path, b: Path) -> None:
        calls.append(a)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        portable.replace(tmp_path / "a", tmp_path / "b")
    assert len(calls) == 1


def test_memory_on_any_os(monkeypatch: pytest.MonkeyPatch) -> None:
    total, free = hardware.memory_gib()
    assert total == pytest.approx(psutil.virtual_memory().total / 2**30)
    assert 0 < free <= total

    def broken() -> None:
        raise OSError("no memory figures here")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    assert hardware.memory_gib() == (0.0, 0.0)


def test_cpu_and_mappings_off_linux(monkeypatch: pytest.MonkeyPatch, not_linux: None) -> None:
    from llmhost.engine.backends.llamacpp import kernels

    hardware.cpu_info.cache_clear()
    monkeypatch.setattr("platform.processor", lambda: "Apple M2")
    try:
        info = hardware.cpu_info()
        assert info.model == "Apple M2" and info.flags == frozenset()
    finally:
        hardware.cpu_info.cache_clear()
    assert portable.mapped_files() == [] and kernels._maps() == []
    portable.trim_malloc()  # no glibc to call: nothing happens


def test_cpu_and_mappings_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads Linux's /proc")
    assert "flags" in portable.cpuinfo_text() or "Features" in portable.cpuinfo_text()
    assert any(path.name.startswith("libc") for *_, path in portable.mapped_files())


def test_child_options_per_os(monkeypatch: pytest.MonkeyPatch) -> None:
    linux = portable.child_options(group=True, tied=True, env={"A": "1"})
    assert linux["start_new_session"] and callable(linux["preexec_fn"]) and linux["env"] == {"A": "1"}
    monkeypatch.setattr(portable, "IS_LINUX", False)
    mac = portable.child_options(group=True, tied=True, env={"A": "1"})
    assert "preexec_fn" not in mac and mac["env"] == {"A": "1", portable.PARENT_ENV: str(os.getpid())}
    monkeypatch.setattr(portable, "IS_WINDOWS", True)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    win = portable.child_options(group=True, tied=False, env=None)
    assert win == {"creationflags": 0x200}


def test_a_watching_child_ends_with_its_parent_off_linux() -> None:
    # the parent starts its child as macOS and Windows do (no death signal: the child watches
    # the parent's pid), then is SIGKILLed: the child must not outlive it
    parent = _python(
        """
        import subprocess, sys, time
        from llmhost import portable
        portable.IS_LINUX = False
        child = subprocess.Popen(
            [sys.executable, "-c",
             "from llmhost.portable import watch_parent; watch_parent(0.1); import time; time.sleep(120)"],
            **portable.child_options(group=False, tied=True, env=None),
        )
        print(child.pid, flush=True)
        time.sleep(120)
        """,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(1.0)  # the child is up and watching
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        child.kill()
        pytest.fail("the child outlived its parent")


def test_group_killer_ends_the_tree_on_windows(windows: None) -> None:
    # Windows has no process groups to kill: the tree is taken before the child is stopped
    root = _python(
        """
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(grandchild.pid, flush=True)
        time.sleep(120)
        """
    )
    assert root.stdout is not None
    grandchild = psutil.Process(int(root.stdout.readline()))
    kill_rest = portable.group_killer(root)
    root.kill()
    root.wait()
    kill_rest()
    grandchild.wait(10)
    assert not grandchild.is_running()
