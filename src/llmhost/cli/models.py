"""`llmhost pull / list / show / rm / import`: the store from the command line."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from llmhost.cli.common import console
from llmhost.store.catalog import CatalogEntry, catalog, close_matches, find
from llmhost.store.hubs import RemoteFile, make_hub
from llmhost.store.local import Store, StoredModel, import_path
from llmhost.store.pull import plan, pull
from llmhost.store.settings import PullOptions


class RichProgress:
    """Byte progress: one bar for the whole pull, one per file while it downloads."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall = progress.add_task("total", total=None)
        self.files: dict[str, TaskID] = {}
        self.completed: dict[str, int] = {}

    def total(self, files: list[RemoteFile]) -> None:
        self.progress.update(self.overall, total=sum(f.size or 0 for f in files))

    def start(self, path: str, total: int | None, initial: int) -> None:
        if path not in self.files:
            self.files[path] = self.progress.add_task(f"  {path}", total=total)
        self.progress.update(self.files[path], total=total, completed=initial)
        self._set(path, initial)

    def advance(self, path: str, n: int) -> None:
        if path in self.files:
            self.progress.advance(self.files[path], n)
        self._set(path, self.completed.get(path, 0) + n)

    def done(self, path: str, size: int) -> None:
        if path in self.files:
            self.progress.update(self.files[path], visible=False)
        self._set(path, size)

    def _set(self, path: str, value: int) -> None:
        self.completed[path] = value
        self.progress.update(self.overall, completed=sum(self.completed.values()))


def run_pull(ref: str, opts: PullOptions) -> StoredModel:
    p = plan(ref, opts.source, opts.revision, tuple(opts.include), opts.quant, opts.name)
    hub = make_hub(p.source, opts.endpoint, opts.token, opts.mirror)
    console.print(f"Pulling {p.repo} ({p.revision}) from {hub.endpoint} as {p.name!r}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bars:
        progress = RichProgress(bars)
        model = pull(p, hub, Store(), progress, on_total=progress.total)
    console.print(
        f"[green]✓[/green] {model.name}: {len(model.files)} files, {human(model.size)}, "
        f"revision {model.revision}, in {model.folder}"
    )
    from llmhost.engine.backends.qwen1 import is_qwen1

    if is_qwen1(model.folder):  # the first chat should not wait for this
        from llmhost.engine.ref import resolve_ref

        with console.status("Converting Qwen-1 to Qwen2 (once; no remote code needed)…"):
            resolve_ref(model.name).hf_folder()
        console.print(f"  {model.name} runs as Qwen2 on every engine (converted once, no remote code)")
    elif p.entry and p.entry.remote_code:
        hint = f" Its successor {p.entry.successor} loads without it." if p.entry.successor else ""
        console.print(
            f"[yellow]note:[/yellow] {p.entry.name} runs Python code shipped with it: load it "
            f"with --trust-remote-code only if you trust the publisher.{hint}"
        )
    return model


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def list_models(as_json: bool) -> None:
    models = Store().list()
    if as_json:
        typer.echo(
            json.dumps(
                [{**m.to_json(), "path": str(m.folder), "size": m.size} for m in models], ensure_ascii=False
            )
        )
        return
    if not models:
        console.print(
            "The store is empty. `llmhost pull qwen2.5-1.5b-instruct` fetches a model; "
            "`llmhost import PATH` adds one you have."
        )
        return
    table = Table("NAME", "SOURCE", "REVISION", "FORMAT", "SIZE", "PATH", box=None)
    for m in models:
        table.add_row(m.name, m.source, (m.revision or "")[:12], m.format, human(m.size), str(m.folder))
    console.print(table)


def show(name: str, as_json: bool) -> None:
    entry = find(name)
    stored = Store().get(name) or (Store().get(entry.name) if entry else None)
    if entry is None and stored is None:
        from llmhost.errors import ModelNotFoundError

        close = close_matches(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"no model {name!r} in the catalog or the store{hint}")
    facts: dict[str, Any] = {}
    if entry:
        facts["catalog"] = catalog_facts(entry)
    if stored:
        facts["local"] = {**stored.to_json(), "path": str(stored.folder), "size": stored.size}
    if as_json:
        typer.echo(json.dumps(facts, ensure_ascii=False, indent=2))
        return
    for section, values in facts.items():
        console.print(f"[bold]{section}[/bold]")
        for key, value in values.items():
            if key == "files":
                value = f"{len(value)} files"
            console.print(f"  {key:<14} {value}")


def catalog_facts(e: CatalogEntry) -> dict[str, Any]:
    return {
        "name": e.name,
        "description": e.description,
        "repos": e.repos,
        "default_source": e.default_source(),
        "task": e.task,
        **({"matryoshka_min_dimensions": e.matryoshka} if e.matryoshka else {}),
        "params_billion": e.params_b,
        "context": e.context,
        "license": e.license,
        "chat_format": e.chat_format,
        "remote_code": e.remote_code,
        "successor": e.successor,
        "gguf": e.gguf.files if e.gguf else {},
    }


def show_catalog(as_json: bool) -> None:
    entries = list(catalog().values())
    if as_json:
        typer.echo(json.dumps([catalog_facts(e) for e in entries], ensure_ascii=False))
        return
    table = Table("NAME", "PARAMS", "CONTEXT", "LICENSE", "SOURCES", "NOTES", box=None)
    for e in entries:
        notes = (
            "remote code; successor " + (e.successor or "-")
            if e.remote_code
            else ("embedded" if e.embedded else {"embed": "embeddings", "rerank": "reranker"}.get(e.task, ""))
        )
        table.add_row(e.name, f"{e.params_b:g}B", str(e.context), e.license, ", ".join(e.repos), notes)
    console.print(table)


def remove(name: str, yes: bool) -> None:
    store = Store()
    model = store.require(name)
    if not yes and not typer.confirm(f"Delete {model.name} ({human(model.size)}) from {model.folder}?"):
        raise typer.Exit(1)
    store.remove(name)
    console.print(f"removed {model.name}")


def run_import(path: str, name: str | None, task: str | None = None) -> None:
    from pathlib import Path

    model = import_path(Store(), Path(path), name, task)
    console.print(
        f"[green]✓[/green] imported {model.name} ({model.format}, {human(model.size)}) into {model.folder}"
    )
