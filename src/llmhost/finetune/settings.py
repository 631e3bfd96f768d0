"""Options of `llmhost finetune`; its flags derive from these fields. Defaults follow the common
Qwen LoRA recipe (r=8, alpha=32, dropout 0.1, 3 epochs, max length 384) with the learning rate
raised to 5e-4, within the LoRA paper's range (2e-4 to 5e-4): the data sets people bring are small
(tens of examples, a handful of optimizer steps), and 1e-4 taught them nothing. Measured on the
embedded model, 24 examples of a made-up fact, 3 epochs (18 steps), final train loss and whether
the model then answers with the fact: 1e-4 0.49 no; 2e-4 0.017 yes; 5e-4 0.0014 yes; 1e-3 0.0003 yes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class FinetuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="Training data: JSONL in chat (messages), Alpaca or ShareGPT format.")
    eval: Path | None = Field(
        None, description="Evaluation data (same formats); eval loss is reported per epoch."
    )
    name: str = Field(description="Store name of the result (base reference + adapter).")
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the data.")
    lr: float = Field(
        5e-4, gt=0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay)."
    )
    warmup: float = Field(
        0.03, ge=0, lt=1, description="Fraction of the steps spent warming up the learning rate."
    )
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout.")
    max_length: int = Field(
        384, ge=16, le=131072, description="Longest example in tokens; longer ones are skipped."
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per forward pass.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Forward passes per optimizer step.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names to adapt (repeatable); default: every linear layer in the "
        "transformer blocks.",
    )
    seed: int = Field(42, ge=0, description="Seed for the data order, dropout and LoRA initialisation.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every this many optimizer steps.")
    strict: bool = Field(False, description="Stop on any bad line of the data instead of skipping it.")
    resume: bool = Field(
        False,
        description="Continue the run NAME from its last complete checkpoint (rerunning the same "
        "command does too).",
    )
    overwrite: bool = Field(False, description="Replace an existing model or run named NAME.")
    qlora: bool = Field(False, description="Load the base in 4 bits (bitsandbytes, CUDA GPUs only).")

    def fingerprint(self, base: str, data_sha: str) -> str:
        """What must match for a rerun to continue a run: everything that changes the result."""
        keep = self.model_dump(
            mode="json", exclude={"resume", "overwrite", "strict", "save_steps", "data", "eval"}
        )
        blob = json.dumps({"base": base, "data": data_sha, **keep}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
