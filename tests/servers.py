"""Test helpers around real processes: `llmhost serve` (from the package, as the benches use it),
`llmhost web`, a recording proxy."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from llmhost.procs import ServerProcess, owned_popen

__all__ = ["RecordingProxy", "ServerProcess", "WebProcess", "metric", "wait_for"]


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
