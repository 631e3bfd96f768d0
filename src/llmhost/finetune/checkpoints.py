"""Checkpoints that are complete or absent: each is written into a temporary folder and renamed
into place in one step, so a kill in the middle of a save never leaves one that looks complete."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llmhost import portable

NAME = re.compile(r"^checkpoint-(\d{6,})$")
KEEP = 2  # the newest complete checkpoints kept on disk


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint; temporary folders of interrupted saves are removed."""
    if not folder.is_dir():
        return None
    for leftover in folder.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = sorted(
        (p for p in folder.iterdir() if NAME.match(p.name)), key=lambda p: int(NAME.match(p.name)[1])
    )
    return done[-1] if done else None


def save(
    folder: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], dist: Any
) -> Path:
    """Every process writes its random state; the main one writes the rest and renames."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (f".tmp-{step:06d}-{os.getpid()}" if dist.world == 1 else f".tmp-{step:06d}-shared")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    if _mps(torch):
        rng["mps"] = torch.mps.get_rng_state()
    save_file(rng, str(tmp / f"rng-{dist.rank}.safetensors"))
    if dist.is_main:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")  # tensors and numbers: weights_only loads
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "scheduler": scheduler.state_dict()}, indent=1),
            encoding="utf-8",
        )
    dist.barrier()
    final = folder / f"checkpoint-{step:06d}"
    if dist.is_main:
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            portable.fsync_file(f)
        portable.replace(tmp, final)
        for old in sorted(p for p in folder.iterdir() if NAME.match(p.name))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, rank: int = 0) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from llmhost.store.weights import check_safetensors

    mine = path / f"rng-{rank}.safetensors"
    rng_file = mine if mine.exists() else path / "rng-0.safetensors"
    check_safetensors(path / "adapter.safetensors", rng_file)
    weights = load_file(str(path / "adapter.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if "mps" in rng and _mps(torch):
        torch.mps.set_rng_state(rng["mps"])
    return state


def _mps(torch: Any) -> bool:
    """Apple silicon's GPU, whose generator drives dropout there (exact resume needs its state)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()
