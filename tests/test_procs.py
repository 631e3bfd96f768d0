"""Children llmhost starts (and the test suite's servers) never outlive their starter: a crash of
the starter (SIGKILL, a segfault) takes them down, and their process group ends whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from servers import wait_for

STARTER = """
import sys, time
from llmhost.procs import owned_popen
child = owned_popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's (prctl)")
def test_a_child_dies_with_a_starter_that_crashes() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    child = psutil.Process(int(starter.stdout.readline()))
    assert child.is_running() and child.ppid() == starter.pid
    starter.send_signal(signal.SIGKILL)  # as a segfault ends a process: no cleanup code runs
    starter.wait(10)
    assert wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10)


def test_stopping_a_child_ends_its_process_group() -> None:
    from llmhost.procs import owned_popen, stop_group

    # a child that starts a worker of its own and ignores SIGTERM, as a stuck server might
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        "print(w.pid, flush=True); time.sleep(120)"
    )
    proc = owned_popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    worker = psutil.Process(int(proc.stdout.readline()))
    assert os.getpgid(worker.pid) == proc.pid  # the child leads a group of its own
    stop_group(proc, timeout=1)
    assert proc.returncode == -signal.SIGKILL
    assert wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 10)


def test_a_start_is_waited_for_while_it_works_and_given_up_when_it_stalls() -> None:
    """Readiness waits follow progress (CPU used by the child's tree), not a fixed deadline: on a
    busy machine a server's start is slow, not stuck."""
    import time

    from llmhost.procs import owned_popen, stop_group, wait_progressing

    working = owned_popen([sys.executable, "-c", "while True: pass"])
    stalled = owned_popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = time.monotonic()
        assert not wait_progressing(lambda: False, working.pid, idle_s=1.0, cap_s=4.0)
        assert time.monotonic() - started > 3.5  # waited past idle_s: it kept working, up to the cap
        time.sleep(1.0)  # the sleeper's start-up ticks are behind it
        started = time.monotonic()
        assert not wait_progressing(lambda: False, stalled.pid, idle_s=1.0, cap_s=30.0)
        assert time.monotonic() - started < 5  # no CPU used: given up after idle_s
        ready_at = time.monotonic() + 1.5
        assert wait_progressing(lambda: time.monotonic() > ready_at, stalled.pid, idle_s=10.0)
    finally:
        stop_group(working, 1)
        stop_group(stalled, 1)
