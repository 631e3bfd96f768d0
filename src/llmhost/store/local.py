"""The local store: one folder per model under `<llmhost home>/models`, each with a manifest.

A model exists only once its manifest is in place: pulls and imports are assembled in
`.partial/<folder>` (kept between runs, so a pull resumes) and renamed into place when every
file is complete and verified. Folders without a manifest are never listed or loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmhost import portable
from llmhost.config import llmhost_home
from llmhost.errors import InvalidRequestError, LlmhostError, ModelNotFoundError
from llmhost.store.names import check_name, folder_name

MANIFEST = "llmhost-model.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class StoredModel:
    name: str
    folder: Path
    format: str
    """"hf" (a transformers folder) or "gguf"."""
    source: str
    """"modelscope", "hf", "import" or "finetune"."""
    repo: str | None = None
    revision: str | None = None
    """The exact commit pulled, so a model can be fetched again identically."""
    files: tuple[StoredFile, ...] = ()
    created: float = 0.0
    catalog: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def load_path(self) -> Path:
        """What the engine loads: the folder, or the GGUF file in it."""
        if self.format == "gguf":
            return self.folder / next(f.path for f in self.files if f.path.endswith(".gguf"))
        return self.folder

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("folder")
        return data


class StoreError(LlmhostError):
    pass


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else llmhost_home() / "models"

    def folder(self, name: str) -> Path:
        return self.root / folder_name(name)

    def staging(self, name: str) -> Path:
        return self.root / ".partial" / folder_name(name)

    def get(self, name: str) -> StoredModel | None:
        try:
            folder = self.folder(name)
        except InvalidRequestError:
            return None
        return _read(folder)

    def require(self, name: str) -> StoredModel:
        model = self.get(name)
        if model is None:
            known = [m.name for m in self.list()]
            import difflib

            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `llmhost list` shows the store"
            raise ModelNotFoundError(f"no model {name!r} in the store{hint}")
        return model

    def list(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        found = (_read(p) for p in sorted(self.root.iterdir()) if not p.name.startswith("."))
        return [m for m in found if m is not None]

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = False) -> Iterator[None]:
        """One writer per model across processes (pulls, imports, removals)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        try:
            with portable.file_lock(locks / (folder_name(name) + ".lock"), wait):
                yield
        except portable.Busy:
            raise StoreError(
                f"another llmhost process is writing {name!r} (a pull or import); wait for it to finish"
            ) from None

    @contextlib.contextmanager
    def write(self, name: str, *, resume: bool = False) -> Iterator[StoreWrite]:
        """The one way into the store: lock the name, assemble the model in its staging folder,
        then `commit()` it in one rename. Without a commit the staging folder is removed, unless
        `resume` keeps it for the next run (a pull continues where it stopped)."""
        with self.lock(name):
            staging = self.staging(name)
            if not resume:
                shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
            writer = StoreWrite(self, name, staging)
            try:
                yield writer
            finally:
                if writer.stored is None and not resume:
                    shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str) -> StoredModel:
        model = self.require(name)
        with self.lock(name):
            self._discard(model.folder)
        return model

    def _discard(self, folder: Path) -> None:
        shutil.rmtree(self._to_trash(folder), ignore_errors=True)

    def _to_trash(self, folder: Path) -> Path:
        """Gone from the store at once (one rename into .trash), even when deleting is slow."""
        trash = self.root / ".trash" / f"{folder.name}-{os.getpid()}-{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        portable.replace(folder, trash)
        return trash


class StoreWrite:
    """A model being written under the store's lock (see `Store.write`)."""

    def __init__(self, store: Store, name: str, staging: Path) -> None:
        self.store = store
        self.name = name
        self.staging = staging
        self.stored: StoredModel | None = None

    def commit(self, fmt: str, source: str, **record: Any) -> StoredModel:
        """Write the manifest (files listed from the staging folder unless given), then move the
        folder into place in one rename; an existing model of the name is replaced."""
        record.setdefault("files", describe_files(self.staging))
        record.setdefault("created", time.time())
        model = StoredModel(name=self.name, folder=self.staging, format=fmt, source=source, **record)
        manifest = self.staging / MANIFEST
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(model.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        portable.replace(tmp, manifest)
        target = self.store.folder(self.name)
        old = self.store._to_trash(target) if target.exists() else None  # an update: swap, then delete
        portable.replace(self.staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.stored = _read(target)
        assert self.stored is not None
        return self.stored


def read_manifest(folder: Path) -> StoredModel | None:
    """The store's record of a folder, or None for folders that are not (complete) store models."""
    return _read(folder)


def _read(folder: Path) -> StoredModel | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = tuple(StoredFile(**f) for f in data.pop("files", []))
        return StoredModel(folder=folder, files=files, **data)
    except (OSError, ValueError, TypeError):
        return None


def describe_files(folder: Path) -> tuple[StoredFile, ...]:
    return tuple(
        StoredFile(str(p.relative_to(folder).as_posix()), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    )


def import_path(store: Store, path: Path, name: str | None = None, task: str | None = None) -> StoredModel:
    """Add a local HF folder or .gguf file to the store (hard links where possible, else copies);
    `task` declares what its files cannot say (a yes/no reranker's files are a chat model's)."""
    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        fmt, files = "gguf", [path]
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise InvalidRequestError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    elif path.is_dir() and (path / "config.json").is_file():
        fmt = "hf"
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _skipped(p.relative_to(path))]
        if not any(p.suffix == ".safetensors" for p in files):
            raise InvalidRequestError(
                f"{path} has no .safetensors weights; llmhost does not load pickled weights (.bin). "
                "Convert them first (for example with transformers' save_pretrained(safe_serialization=True))"
            )
    elif path.exists():
        raise InvalidRequestError(
            f"{path} is neither a Hugging Face model folder (with config.json) nor a .gguf file"
        )
    else:
        raise InvalidRequestError(f"{path} does not exist")
    name = check_name(name or (path.stem if fmt == "gguf" else path.name).lower())
    with store.write(name) as w:
        if store.get(name):
            raise InvalidRequestError(
                f"the store already has {name!r}; pick another --name or `llmhost rm {name}`"
            )
        base = path.parent if fmt == "gguf" else path
        for src in files:
            dst = w.staging / src.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return w.commit(fmt, "import", repo=str(path), extra={"task": task} if task else {})


def _skipped(rel: Path) -> bool:
    """Files an import leaves behind: pickles, hidden files and caches."""
    return rel.suffix in PICKLE_SUFFIXES or any(part.startswith(".") for part in rel.parts)
