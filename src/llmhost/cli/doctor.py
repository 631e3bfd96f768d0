"""`llmhost doctor` and `llmhost estimate`: render the facts and the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from llmhost.cli.common import console
from llmhost.config import KV_ELEMENT_BYTES, llmhost_home
from llmhost.errors import InvalidRequestError
from llmhost.hardware import nvidia_report, parse_nvidia_smi
from llmhost.store.catalog import find
from llmhost.store.doctor import Report, build_report, torch_facts
from llmhost.store.estimate import estimate, shape_from_folder, shape_of


def run_doctor(as_json: bool, context: int, nvidia_smi: Path | None) -> None:
    if nvidia_smi is not None:
        try:
            nvidia = parse_nvidia_smi(nvidia_smi.read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise InvalidRequestError(f"cannot read --nvidia-smi {nvidia_smi}: {err.strerror}") from None
    else:
        nvidia = nvidia_report()
    report = build_report(nvidia, torch_facts(), llmhost_home(), context)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        return
    _print(report)


def _print(r: Report) -> None:
    console.print(f"[bold]System[/bold]  {r.os}, Python {r.python}")
    console.print(
        f"  RAM {r.ram_total_gib} GiB ({r.ram_available_gib} GiB available); "
        f"{r.disk_free_gib} GiB free for models in {r.store}"
    )
    torch = r.torch
    build = (
        f"CUDA {torch.cuda}"
        if torch.cuda
        else f"ROCm {torch.hip}"
        if torch.hip
        else "MPS"
        if torch.mps
        else "CPU build"
    )
    console.print(f"  torch {torch.version or 'not installed'} ({build}); CPU {escape(r.cpu)}")
    n = r.nvidia
    if torch.gpus and not n.gpus:
        console.print(f"[bold]GPUs[/bold]  {r.gpu_kind}")
        for g in torch.gpus:
            console.print(f"  {g.index}: {g.name}, {g.memory_total_mib / 1024:.1f} GiB")
    elif r.gpu_kind.startswith("Apple"):
        console.print(f"[bold]GPUs[/bold]  {r.gpu_kind}: {r.ram_total_gib} GiB shared with the CPU")
    elif n.gpus:
        console.print(
            f"[bold]GPUs[/bold]  driver {n.driver_version}, "
            f"supports CUDA up to {n.cuda_version} (via {n.via})"
        )
        for g in n.gpus:
            console.print(
                f"  {g.index}: {g.name}, {g.memory_total_mib / 1024:.1f} GiB "
                f"({g.memory_used_mib / 1024:.1f} GiB in use now)"
            )
    else:
        console.print(f"[bold]GPUs[/bold]  none: {n.problem or 'no NVIDIA GPU'}")
    # escaped: Rich would take `llmhost[llamacpp]` in an install hint for markup and drop it
    console.print("[bold]Engines[/bold]  " + "; ".join(f"{k}: {escape(v)}" for k, v in r.engines.items()))
    if r.repack:
        console.print(f"  llama.cpp weight repack (--weight-repack): {escape(r.repack)}")
    mark = "[green]ok[/green]" if r.advice.ok else "[yellow]fix[/yellow]"
    console.print(f"[bold]Verdict[/bold] {mark}: {escape(r.advice.message)}")
    if r.advice.command:
        console.print(f"  run: [bold]{escape(r.advice.command)}[/bold]")
    where = (
        "RAM"
        if not r.on_gpu
        else "the GPU's share of memory"
        if r.gpu_kind.startswith("Apple")
        else "the largest GPU"
    )
    table = Table(
        "MODEL",
        "FITS AS",
        "NEEDS (GiB)",
        "ROOM (GiB)",
        box=None,
        title=f"Catalog models in {where}, {r.context}-token context",
    )
    for f in r.fits:
        room = f"[green]{f.room_gib:.1f}[/green]" if f.room_gib >= 0 else f"[red]{f.room_gib:.1f}[/red]"
        table.add_row(f.model, f.dtype if f.room_gib >= 0 else "-", f"{f.need_gib:.1f}", room)
    console.print(table)
    if r.recommendation:
        console.print(
            f"Recommended: [bold]{r.recommendation}[/bold]  "
            f"(llmhost pull {r.recommendation} && llmhost web {r.recommendation})"
        )


def run_estimate(
    model: str, context: int | None, dtypes: list[str], as_json: bool, kv_cache: str | None = None
) -> None:
    entry = find(model)
    if entry is not None:
        shape = shape_of(entry)
    else:
        from llmhost.store.local import Store

        stored = Store().get(model)
        folder = stored.folder if stored and stored.format == "hf" else Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise InvalidRequestError(
                f"no model {model!r}: give a catalog name, a store name or an HF folder"
            )
        shape = shape_from_folder(folder)
    if kv_cache is not None and kv_cache not in KV_ELEMENT_BYTES:
        raise InvalidRequestError(f"--kv-cache {kv_cache!r}: one of {', '.join(KV_ELEMENT_BYTES)}")
    rows = [
        estimate(shape, d, context, kv_cache=kv_cache) for d in (dtypes or ["bfloat16", "int8", "q4_k_m"])
    ]
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in rows]))
        return
    cache = f"{shape.kv_heads} KV heads × {shape.head_dim}" if shape.kv_heads else "no KV cache"
    console.print(
        f"{model}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, {cache}, "
        f"context {rows[0].context}"
    )
    table = Table("DTYPE", "WEIGHTS", f"KV CACHE ({rows[0].kv_cache})", "OVERHEAD", "TOTAL (GiB)", box=None)
    for e in rows:
        table.add_row(
            e.dtype,
            f"{e.weights_gib:.2f}",
            f"{e.kv_cache_gib:.2f}",
            f"{e.overhead_gib:.2f}",
            f"{e.total_gib:.2f}",
        )
    console.print(table)
