"""A Hugging Face hub on 127.0.0.1 that speaks enough of the real protocol for `huggingface_hub`
(repo info with file metadata, HEAD/GET on resolve URLs, Range requests), with faults to inject.

The hub on the internet cannot be reached from the test machines; this server stands in for it,
so the real client library runs its real transfer, resume and error paths.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

COMMIT = "1f2e3d4c5b6a79880123456789abcdef01234567"


@dataclass
class Faults:
    status: dict[str, int] = field(default_factory=dict)
    """Repo id → HTTP status for every request about it (401, 403 gated, 404, 500)."""
    drop_after: dict[str, int] = field(default_factory=dict)
    """File path → drop the connection after this many body bytes, on the first GET only."""
    corrupt: set[str] = field(default_factory=set)
    """File paths served with one byte flipped (size unchanged, sha256 wrong)."""
    delay_per_chunk: float = 0.0
    """Seconds between 64 KiB chunks: a slow server."""


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.faults = Faults()
        self.log: list[tuple[str, str, str]] = []  # (method, path, range)
        self.bytes_sent = 0
        self.tags: set[str] = set()  # more revision names the hub knows (e.g. the tutorial's v1.1.4)
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_repo(self, repo: str, folder: Path | None = None, files: dict[str, bytes] | None = None) -> None:
        content = dict(files or {})
        if folder is not None:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    content[p.relative_to(folder).as_posix()] = p.read_bytes()
        self.repos[repo] = content

    def gets(self, path_suffix: str) -> list[str]:
        """The Range headers of the GETs of one file ('' when none)."""
        return [
            r
            for m, p, r in self.log
            if m == "GET" and (p.endswith(path_suffix) or f"FilePath={path_suffix.lstrip('/')}" in p)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- protocol -------------------------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.log.append(("HEAD" if head else "GET", unquote(h.path), h.headers.get("Range", "")))
        query = dict(parse_qsl(urlsplit(h.path).query))
        if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo/files$", path):
            return self._ms_files(h, m.group(1), query.get("Revision", "master"))
        if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo$", path):
            return self._file(h, m.group(1), query.get("FilePath", ""), head)
        if m := re.match(r"^/api/models/(.+?)(?:/revision/([^/]+))?$", path):
            return self._info(h, m.group(1), m.group(2) or "main")
        if m := re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", path):
            return self._file(h, m.group(1), m.group(3), head)
        self._error(h, 404, "Entry not found", "EntryNotFound")

    def _repo(self, h: http.server.BaseHTTPRequestHandler, repo: str) -> dict[str, bytes] | None:
        status = self.faults.status.get(repo)
        if status == 403:
            self._error(h, 403, f"Access to model {repo} is restricted.", "GatedRepo")
            return None
        if status:
            self._error(h, status, f"status {status}", "RepoNotFound" if status in (401, 404) else None)
            return None
        if repo not in self.repos:
            self._error(h, 401, "Repository not found", "RepoNotFound")  # what the real hub answers
            return None
        return self.repos[repo]

    def _info(self, h: http.server.BaseHTTPRequestHandler, repo: str, revision: str) -> None:
        files = self._repo(h, repo)
        if files is None:
            return
        if revision not in ("main", COMMIT, *self.tags):
            return self._error(h, 404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = []
        for name, data in files.items():
            entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith((".safetensors", ".gguf", ".bin")):
                entry["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        body = {
            "_id": "x",
            "id": repo,
            "modelId": repo,
            "sha": COMMIT,
            "private": False,
            "siblings": siblings,
        }
        self._json(h, 200, body)

    def _ms_files(self, h: http.server.BaseHTTPRequestHandler, repo: str, revision: str) -> None:
        """ModelScope's listing: sizes and sha256 for every file."""
        files = self._repo(h, repo)
        if files is None:
            return
        if revision not in ("master", COMMIT, *self.tags):
            return self._json(
                h, 404, {"Code": 10010205001, "Message": f"revision {revision} not found", "Success": False}
            )
        listing = [
            {"Path": n, "Name": n.rsplit("/", 1)[-1], "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest(),
             "Type": "blob", "Revision": COMMIT}
            for n, d in files.items()
        ]  # fmt: skip
        self._json(h, 200, {"Code": 200, "Data": {"Files": listing}, "Message": "success", "Success": True})

    def _file(self, h: http.server.BaseHTTPRequestHandler, repo: str, name: str, head: bool) -> None:
        files = self._repo(h, repo)
        if files is None:
            return
        if name not in files:
            return self._error(h, 404, "Entry not found", "EntryNotFound")
        data = files[name]
        etag = (
            hashlib.sha256(data).hexdigest()
            if name.endswith((".safetensors", ".gguf"))
            else hashlib.sha1(data).hexdigest()
        )
        if name in self.faults.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if m := re.match(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(m.group(1))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        limit = len(data)
        drop = self.faults.drop_after.get(name)
        if drop is not None and name not in self._dropped:
            self._dropped.add(name)
            limit = min(limit, start + drop)
        pos = start
        try:
            while pos < limit:
                chunk = data[pos : min(limit, pos + 65536)]
                h.wfile.write(chunk)
                h.wfile.flush()
                pos += len(chunk)
                with self._lock:
                    self.bytes_sent += len(chunk)
                if self.faults.delay_per_chunk:
                    time.sleep(self.faults.delay_per_chunk)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(data):  # cut the connection mid-body
            h.close_connection = True
            h.connection.shutdown(2)

    def _json(
        self, h: http.server.BaseHTTPRequestHandler, status: int, body: object, headers: dict | None = None
    ) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)

    def _error(
        self, h: http.server.BaseHTTPRequestHandler, status: int, message: str, code: str | None
    ) -> None:
        self._json(
            h,
            status,
            {"error": message},
            {"X-Error-Code": code, "X-Error-Message": message} if code else None,
        )
