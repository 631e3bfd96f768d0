"""`llmhost serve --engine X` on the embedded model, one server per engine, started once per test
session and shared by the behavioural suite (test_engines.py) and the vLLM tests. The local
engines and the openai front serve in this process (`LocalServer`); vLLM's is a process of its
own, whose vLLM child the vLLM tests inspect.

An engine that is not installed is skipped with the reason, or fails the run where
LLMHOST_REQUIRE_ENGINES=1 (CI installs them all, so a skip there would hide a broken engine).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from servers import LocalServer, ServerProcess, metric

ENGINES = ("transformers", "llamacpp", "vllm", "openai")
MODEL = "smollm2-135m-instruct"
KEY = "front-key"
# float32 everywhere: greedy text is compared across engines, and bf16 rounding would differ
VLLM_FLAGS = ("--engine", "vllm", "--dtype", "float32")


def missing(kind: str) -> str | None:
    """Why `kind` cannot run here, or None."""
    if kind == "llamacpp":
        from llmhost.engine.backends.llamacpp import INSTALL, available

        return None if available() else f"llama-cpp-python is not installed: {INSTALL}"
    if kind == "vllm":
        from llmhost.installs import VLLM_INSTALL, find_vllm

        given = os.environ.get("LLMHOST_VLLM_PYTHON")
        return None if find_vllm(Path(given) if given else None) else f"vLLM not found: {VLLM_INSTALL}"
    return None


def require(kind: str) -> None:
    reason = missing(kind)
    if reason is None:
        return
    if os.environ.get("LLMHOST_REQUIRE_ENGINES") == "1":
        pytest.fail(f"LLMHOST_REQUIRE_ENGINES=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Served:
    kind: str
    server: LocalServer | ServerProcess
    #: the shared server behind the openai front (stopped as its own engine's server, not here)
    upstream: Served | None = None

    def client(self, key: str | None = KEY):
        return self.server.client(key)

    def engine_busy(self) -> float:
        """Requests the engine behind the front is still generating (the upstream's own count)."""
        if self.upstream is not None:
            return self.upstream.engine_busy()
        if self.kind == "vllm":
            with vllm_http(self.server) as http:
                text = http.get("/metrics").text
            return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{.*\} (\S+)$", text, re.M))
        with self.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
            return metric(http.get("/metrics").text, "llmhost_running_requests")

    def stop(self) -> None:
        """Stop the server; vLLM's is stopped as a user stops it (SIGTERM), and none of its vLLM
        processes (API server, engine core) may outlive it."""
        children = vllm_children(self.server) if self.kind == "vllm" else []
        self.server.stop()
        left = until_gone(children)
        assert not left, f"llmhost stopped (SIGTERM) and left vLLM processes: {[p.cmdline() for p in left]}"


def upstream_kind() -> str:
    """The engine behind the openai front: llama.cpp where installed (the fastest here: the front
    only passes requests through, so its tests need an upstream, not a particular one)."""
    return "llamacpp" if missing("llamacpp") is None else "transformers"


def start(kind: str, upstream: Served | None = None) -> Served:
    """`llmhost serve --engine kind`; the openai engine fronts `upstream` (a served engine)."""
    if kind == "openai":
        assert upstream is not None and upstream.kind != "openai"
        front = LocalServer(
            "--engine", "openai", "--upstream", upstream.server.url + "/v1", "--upstream-key", KEY,
            "--api-key", KEY,
        )  # fmt: skip
        return Served(kind, front, upstream)
    if kind == "vllm":
        return Served(
            kind, ServerProcess(*VLLM_FLAGS, "--max-model-len", "2048", "--api-key", KEY, timeout=600)
        )
    return Served(kind, LocalServer("--engine", kind, "--dtype", "float32", "--api-key", KEY))


def vllm_children(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def until_gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """Waits up to `timeout` for `procs` to end; those still running."""
    from servers import wait_for

    wait_for(lambda: not alive(procs), timeout)
    return alive(procs)


def vllm_port(server: ServerProcess) -> int:
    """The private port of the vLLM child behind `server` (from its command line)."""
    for proc in vllm_children(server):
        cmd = " ".join(proc.cmdline())
        if "vllm_child.py" in cmd and (m := re.search(r"--port (\d+)", cmd)):
            return int(m.group(1))
    raise AssertionError("no vLLM child found")


def vllm_http(server: ServerProcess):
    import httpx

    return httpx.Client(base_url=f"http://127.0.0.1:{vllm_port(server)}", timeout=30)
