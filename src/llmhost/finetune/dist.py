"""Data-parallel training when started by `torchrun` or `accelerate launch` (several GPUs, or
several CPU processes): a thin view over accelerate. In a single process every call is a no-op,
so the ordinary path stays plain PyTorch."""

from __future__ import annotations

import os
from typing import Any


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc: Any = None
        if self.world > 1:
            import torch
            from accelerate import Accelerator

            # cpu=True is what makes accelerate set up gloo across CPU processes
            self.acc = Accelerator(cpu=not torch.cuda.is_available())

    @property
    def rank(self) -> int:
        return self.acc.process_index if self.acc else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        """DDP for the model (gradients are averaged across processes at each backward)."""
        if not self.acc:
            return model, optimizer
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model: Any) -> Any:
        return self.acc.unwrap_model(model) if self.acc else model

    def shard(self, order: list[int]) -> list[int]:
        """This process's share of an epoch; every process gets the same count (DDP needs equal
        numbers of backward passes), wrapping around where the data does not divide evenly."""
        if self.world == 1:
            return order
        per = -(-len(order) // self.world)
        padded = (order * (per * self.world // max(len(order), 1) + 1))[: per * self.world]
        return padded[self.rank :: self.world]
