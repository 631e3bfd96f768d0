"""`llmhost pull`: plan which files a model needs, download them with the hub's own client into a
staging folder (resumable), verify sizes and sha256, and only then put the model in the store."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.store.catalog import CatalogEntry, close_matches, find
from llmhost.store.hubs import FileProgress, Hub, HubError, RemoteFile
from llmhost.store.local import PICKLE_SUFFIXES, Store, StoredFile, StoredModel
from llmhost.store.names import check_name

# Files a transformers model needs besides its weights.
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md", "LICENSE*")
SKIPPED_DIRS = ("onnx/", "openvino/", "original/", "coreml/", "tflite/", "runs/", "images/", "assets/")
DISK_MARGIN = 256 * 2**20  # leave room for the manifest, logs and the filesystem's own needs


@dataclass(frozen=True)
class PullPlan:
    name: str
    source: str
    repo: str
    revision: str
    include: tuple[str, ...] = ()
    entry: CatalogEntry | None = None


class DiskFullError(LlmhostError):
    pass


def plan(
    ref: str,
    source: str | None = None,
    revision: str | None = None,
    include: tuple[str, ...] = (),
    quant: str | None = None,
    name: str | None = None,
) -> PullPlan:
    """Turn a catalog name or a hub id into what to fetch and under which store name."""
    entry = find(ref)
    if entry is None and "/" not in ref:
        close = close_matches(ref)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InvalidRequestError(
            f"unknown model {ref!r}: give a catalog name (`llmhost show --catalog`) or a hub id such "
            f"as Qwen/Qwen2.5-1.5B-Instruct{hint}"
        )
    if entry is None:
        src = source or "hf"
        return PullPlan(check_name(name or ref), src, ref, revision or _default_revision(src), include)
    src = source or entry.default_source()
    repos = entry.repos
    if quant:
        if entry.gguf is None or quant.lower() not in entry.gguf.files:
            have = ", ".join(entry.gguf.files) if entry.gguf else "none"
            raise InvalidRequestError(f"{entry.name} has no GGUF quantization {quant!r} (available: {have})")
        repos = entry.gguf.repos
        include = (entry.gguf.files[quant.lower()],)
    if src not in repos:
        raise InvalidRequestError(f"{entry.name} is not on {src}; use --source {next(iter(repos))}")
    default_name = f"{entry.name}-{quant.lower()}" if quant else entry.name
    rev = revision or entry.revisions.get(src) or _default_revision(src)
    return PullPlan(check_name(name or default_name), src, repos[src], rev, include, entry)


def _default_revision(source: str) -> str:
    return "master" if source == "modelscope" else "main"


def select_files(files: list[RemoteFile], include: tuple[str, ...]) -> list[RemoteFile]:
    """The files to fetch: `include` patterns if given; else safetensors weights and small files,
    never pickles. A GGUF-only repository needs a choice unless it has one file."""
    if include:
        chosen = [f for f in files if any(fnmatch.fnmatch(f.path, p) for p in include)]
        if not chosen:
            raise InvalidRequestError(
                f"no file matches --include {' '.join(include)}; the repository has: "
                + ", ".join(f.path for f in files[:30])
            )
        return chosen
    wanted = [f for f in files if not f.path.startswith(SKIPPED_DIRS)]
    weights = [
        f for f in wanted if f.path.endswith(".safetensors") or f.path.endswith(".safetensors.index.json")
    ]
    if any(f.path.endswith(".safetensors") for f in weights):
        small = [f for f in wanted if any(fnmatch.fnmatch(f.path.rsplit("/", 1)[-1], p) for p in SMALL_FILES)]
        return sorted({f.path: f for f in weights + small}.values(), key=lambda f: f.path)
    ggufs = [f for f in wanted if f.path.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise InvalidRequestError(
            "the repository has several GGUF files; pick one with --include (or --quant for catalog "
            "models): " + ", ".join(f.path for f in ggufs)
        )
    if any(f.path.endswith(PICKLE_SUFFIXES) for f in wanted):
        raise InvalidRequestError(
            "the repository has only pickled weights (.bin/.pt), which can run code when loaded; llmhost "
            "loads safetensors and GGUF only. Look for a safetensors or GGUF version of this model"
        )
    raise InvalidRequestError("the repository has no model weights (no .safetensors or .gguf files)")


def pull(
    p: PullPlan,
    hub: Hub,
    store: Store,
    progress: FileProgress,
    on_total: Callable[[list[RemoteFile]], None] | None = None,
) -> StoredModel:
    """Fetch, verify and store. An interruption leaves the staging folder to resume from; a
    failed check or a full disk leaves nothing new in the store."""
    with store.write(p.name, resume=True) as w:
        commit, files = hub.resolve(p.repo, p.revision)
        chosen = select_files(files, p.include)
        _check_space(w.staging, chosen)
        if on_total:
            on_total(chosen)
        try:
            for f in chosen:
                _fetch_verified(hub, p, commit, f, w.staging, progress)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                shutil.rmtree(w.staging, ignore_errors=True)
                raise DiskFullError(
                    f"the disk holding {store.root} is full; the partial download was removed and the "
                    "store is unchanged. Free some space and pull again"
                ) from None
            raise
        for bookkeeping in (".cache", ".parts"):  # hub clients' and llmhost's partial files
            shutil.rmtree(w.staging / bookkeeping, ignore_errors=True)
        return w.commit(
            "gguf" if all(f.path.endswith(".gguf") for f in chosen) else "hf",
            p.source,
            repo=p.repo,
            revision=commit,
            files=tuple(
                StoredFile(f.path, f.size or (w.staging / f.path).stat().st_size, f.sha256) for f in chosen
            ),
            catalog=p.entry.name if p.entry else None,
            extra={"requested_revision": p.revision, "endpoint": hub.endpoint},
        )


def _fetch_verified(
    hub: Hub, p: PullPlan, commit: str, f: RemoteFile, staging: Path, progress: FileProgress
) -> None:
    for attempt in (1, 2):
        path = hub.download(p.repo, commit, f, staging, progress)
        problem = verify(path, f)
        if problem is None:
            progress.done(f.path, path.stat().st_size)
            return
        path.unlink(missing_ok=True)  # never keep a bad file; a second try downloads it afresh
        if attempt == 2:
            raise HubError(
                f"{f.path} from {hub.endpoint} failed its check twice ({problem}); nothing was added to "
                "the store. The server or a proxy may be corrupting downloads: try --mirror or --source"
            )


def verify(path: Path, f: RemoteFile) -> str | None:
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return f"size {size} bytes, expected {f.size}"
    if f.sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != f.sha256.lower():
            return "sha256 mismatch"
    return None


def _check_space(staging: Path, files: list[RemoteFile]) -> None:
    needed = 0
    for f in files:
        have = staging / f.path
        done = have.stat().st_size if have.exists() else 0
        needed += max(0, (f.size or 0) - done)
    free = shutil.disk_usage(staging).free
    if needed + DISK_MARGIN > free:
        raise DiskFullError(
            f"not enough disk space: the download needs {_gib(needed)} more, {_gib(free)} is free at "
            f"{staging.parent.parent}. Free some space or set LLMHOST_HOME to a bigger disk"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
