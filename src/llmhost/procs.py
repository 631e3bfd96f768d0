"""Child processes llmhost starts and owns (the web page's server and page, the vLLM server):
output kept and logged, readiness waits, and no orphans when llmhost dies.

PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so children are started
from the thread that lives as long as they should (the main thread, in every command).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from llmhost import portable
from llmhost.errors import LlmhostError


class ChildFailed(LlmhostError):
    pass


def owned_popen(cmd: list[str], *, group: bool = True, tied: bool = True, **kw: Any) -> subprocess.Popen:
    """A child that does not outlive this process: `tied`, killed when the thread that starts it
    dies (Linux, a crash of ours included; elsewhere the child watches us, see
    `portable.child_options`); with `group`, in a process group of its own, which `stop_group`
    ends whole (workers it started too)."""
    kw.update(portable.child_options(group, tied, kw.pop("env", None)))
    return subprocess.Popen(cmd, **kw)


def stop_group(proc: subprocess.Popen, timeout: float) -> int:
    """`terminate`, then kill what is left of the child's process group."""
    kill_rest = portable.group_killer(proc)
    code = terminate(proc, timeout)
    kill_rest()
    return code


class Child:
    """A child process whose output is kept (the last lines) and copied to a log file.

    `group=True` starts it in its own process group and `stop()` ends the whole group: for
    children that start workers of their own (vLLM), which must not outlive it.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        log: Path,
        *,
        group: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.group = group
        self.log_path = log
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w", encoding="utf-8")  # noqa: SIM115 (closed by the reader thread)
        self.proc = owned_popen(
            cmd,
            group=group,
            tied=die_with_parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        self.lines_seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self._log:
            for line in self.proc.stdout:
                self._log.write(line)
                self._log.flush()
                with self.lines_seen:
                    self.tail.append(line.rstrip())
                    self.lines_seen.notify_all()
        with self.lines_seen:
            self.lines_seen.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self.lines_seen:
            while True:
                for line in self.tail:
                    if m := re.search(pattern, line):
                        return m
                if self.proc.poll() is not None:
                    raise self.failure("exited before it was ready")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.failure(f"was not ready after {timeout:g} s")
                self.lines_seen.wait(min(left, 0.5))

    def last_lines(self, n: int = 12) -> list[str]:
        self._reader.join(timeout=2)  # after an exit, let the reader catch the final lines
        return list(self.tail)[-n:]

    def failure(self, what: str) -> ChildFailed:
        last = "\n".join(f"  {line}" for line in self.last_lines())
        return ChildFailed(f"the {self.name} {what}; its last output:\n{last}\n(full log: {self.log_path})")

    def stop(self, timeout: float = 10) -> None:
        if self.group:  # workers the child left behind go too
            stop_group(self.proc, timeout)
        else:
            terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(pid: int) -> float:
    """CPU time a process and its descendants have used so far (0 where it cannot be read)."""
    try:
        import psutil  # a dependency of accelerate, so present wherever llmhost is

        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except Exception:  # gone, or no psutil
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(Exception):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


#: A start that keeps working is waited for this long at most (a 70B model across nodes).
MAX_START_S = 3600.0


def wait_progressing(
    ready: Callable[[], bool], pid: int, idle_s: float, cap_s: float = MAX_START_S, step: float = 0.2
) -> bool:
    """Wait until `ready()` is true, for as long as the process tree of `pid` keeps working: on
    a busy machine a start is slow, not stuck, so the deadline is `idle_s` seconds without a
    CPU tick used (or `cap_s` in all), not a fixed time. False when it gave up."""
    started = last_progress = time.monotonic()
    used = tree_cpu_seconds(pid)
    while not ready():
        now = time.monotonic()
        if now - last_progress > idle_s or now - started > cap_s:
            return False
        time.sleep(step)
        if (now_used := tree_cpu_seconds(pid)) > used + 0.01:
            used, last_progress = now_used, time.monotonic()
    return True


def wait_http(url: str, timeout: float, child: Child, headers: dict[str, str] | None = None) -> None:
    """Wait until `url` answers 200; `timeout`: seconds of the child making no progress."""

    def answers() -> bool:
        if child.proc.poll() is not None:
            raise child.failure("exited before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=2, headers=headers).status_code == 200
        return False

    if not wait_progressing(answers, child.proc.pid, timeout):
        raise child.failure(f"did not answer {url}, with no progress for {timeout:g} s")


class ServerProcess:
    """`llmhost serve` as a real subprocess on a free loopback port, ready once it says where it
    serves (its own log line); for tests, benchmarks and scripts that drive a server."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 180,
        drop_env: tuple[str, ...] = (),
    ) -> None:
        cmd = [sys.executable, "-u", "-m", "llmhost", "serve", "--port", "0", *args]
        environ = {k: v for k, v in os.environ.items() if k not in drop_env}
        # its own process group (a vLLM child and its workers go with it) that dies with its starter
        self.proc = owned_popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**environ, **(env or {})}
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        # `timeout`: seconds without progress (a load slowed by a busy machine is waited for)
        if not wait_progressing(self._ready.is_set, self.proc.pid, timeout) or not self.url:
            self.stop()
            raise ChildFailed("llmhost serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"llmhost: serving on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, key: str | None = "none") -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def stop(self, timeout: float = 30) -> int:
        return stop_group(self.proc, timeout)
