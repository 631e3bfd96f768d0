"""Test helpers around real servers: `llmhost serve` in this process (`LocalServer`: the same
flags, pool and app on a uvicorn thread) or as a process of its own (`ServerProcess`, for what
only a process shows: signals, exit codes, children), `llmhost web`, a recording proxy."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from llmhost.procs import ServerProcess, owned_popen

__all__ = ["LocalServer", "RecordingProxy", "ServerProcess", "WebProcess", "metric", "wait_for"]


def serve_settings(args: tuple[str, ...]):
    """`llmhost serve ARGS` parsed by the CLI's own command: (models, load, server, pool settings)."""
    from typer.main import get_command

    from llmhost.cli import app
    from llmhost.cli.options import build
    from llmhost.config import LoadSettings, PoolSettings
    from llmhost.server.settings import ServerSettings

    command = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    params = command.make_context("serve", ["--port", "0", *args]).params
    settings = [
        build(cls, {n: params.get(n) for n in cls.model_fields})
        for cls in (LoadSettings, ServerSettings, PoolSettings)
    ]
    return (params.get("models") or None, *settings)


class LocalServer:
    """`llmhost serve ARGS` in this process: the flags parsed by the CLI's command, the pool and
    the app built by the same functions, served by uvicorn on a thread on 127.0.0.1. A real HTTP
    server for real clients, without a process start (python, torch and the model loaded again);
    what the server logs is kept in `lines`."""

    def __init__(self, *args: str, home: Path | None = None) -> None:
        from llmhost.server.run import BackgroundServer, check_exposure, open_pool

        # a process started with LLMHOST_HOME=home: the store is found through the environment
        # for as long as the server runs (models load on their first request)
        self._home_before = os.environ.get("LLMHOST_HOME")
        if home is not None:
            os.environ["LLMHOST_HOME"] = str(home)
        try:
            models, load, server, pool = serve_settings(args)
            check_exposure(server)
        except BaseException:
            self._restore_home()
            raise
        self.lines: list[str] = []
        self._handler = _ListHandler(self.lines)
        logger = logging.getLogger("llmhost")
        logger.addHandler(self._handler)
        if logger.getEffectiveLevel() > logging.INFO:  # what `llmhost serve` logs
            logger.setLevel(logging.INFO)
        try:
            self.background = BackgroundServer(open_pool(models, load, pool), server)
        except BaseException:
            logger.removeHandler(self._handler)
            self._restore_home()
            raise
        self.url = self.background.url
        self.pool = self.background.pool

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, key: str | None = "none"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def stop(self, timeout: float = 30) -> int:
        self.background.stop(timeout)
        logging.getLogger("llmhost").removeHandler(self._handler)
        self._restore_home()
        return 0

    def _restore_home(self) -> None:
        if self._home_before is None:
            os.environ.pop("LLMHOST_HOME", None)
        else:
            os.environ["LLMHOST_HOME"] = self._home_before


class _ListHandler(logging.Handler):
    """Appends each record to a list, formatted as a process would print it."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.out = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(f"{record.levelname}: {record.getMessage()}\n")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 that records each JSON request body and passes responses
    through as they arrive (SSE included), so tests see exactly what a client sent."""

    def __init__(self, target: str) -> None:
        import http.server
        import json

        self.target = target
        self.bodies: list[dict] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if body:
                    proxy.bodies.append(json.loads(body))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                with (
                    httpx.Client(timeout=300) as client,
                    client.stream(
                        self.command, proxy.target + self.path, content=body, headers=headers
                    ) as resp,
                ):
                    self.send_response(resp.status_code)
                    for k, v in resp.headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.end_headers()
                    for part in resp.iter_raw():
                        self.wfile.write(part)
                        self.wfile.flush()

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def chat_bodies(self) -> list[dict]:
        return [b for b in self.bodies if "messages" in b]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebProcess:
    """`llmhost web` as a user starts it, with the URL read from what it prints."""

    def __init__(self, db: Path) -> None:
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "llmhost",
            "web",
            "--no-open-browser",
            "--port",
            "0",
            "--db",
            str(db),
        ]
        self.proc = owned_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line)
                if m := re.search(r"open (http://\S+) in your browser", line):
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or not self.url:
            self.proc.kill()
            raise RuntimeError("llmhost web did not start:\n" + "".join(self.lines))
