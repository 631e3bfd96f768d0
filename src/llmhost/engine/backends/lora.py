"""LoRA adapters applied per row of a batch, for the transformers engine.

Every row of a decoding step may use another adapter (or none). Per adapted linear layer, every
loaded adapter's Aᵀ sits side by side in one matrix and its (scaled) Bᵀ one above another in a
second; a forward hook adds `((x · A_all) ⊙ mask) · B_all`, where the mask keeps, in each row,
only the columns of that row's adapter (none for the plain model). That is two matmuls and a
multiply per layer whatever the mix of adapters in the batch, and a change of the batch's
composition only builds a new mask. peft's mixed-adapter forward loops over the adapters per
layer instead (bench/adapters.py, 8 clients over 4 adapters on the embedded model: 0.56× of
the base's rate with peft, 0.81× with this). The cost grows with the adapters loaded (their
ranks add up to the columns), which for tens of adapters stays below the layer's own matmul.

Each row's numbers depend only on its own adapter's columns, so a row decodes alone as it does
in any batch (tests/test_pool.py checks greedy replies for exact equality).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmhost.errors import LlmhostError
from llmhost.store.weights import check_safetensors

#: peft's saved names: base_model.model.<module>.lora_A.weight (some versions keep the adapter's name).
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class RowLora:
    """The adapters of one model and the hooks that apply them, row by row."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self._hooked: dict[str, Any] = {}
        #: Per module: A_all [in, R], B_all [R, out] and each adapter's column range in them
        #: (the only copy of the adapters' matrices).
        self._banks: dict[str, tuple[Any, Any, dict[str, tuple[int, int]]]] = {}
        self._rows: tuple[str | None, ...] | None = None
        self._masks: dict[tuple[str, tuple[str | None, ...]], Any] = {}

    def add(self, adapter_id: str, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        config = _read_config(path)
        rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, Any]] = {}
        weights = path / "adapter_model.safetensors"
        check_safetensors(weights)
        for key, tensor in load_file(str(weights)).items():
            m = _KEY.match(key)
            if m is None:
                raise LlmhostError(
                    f"the adapter in {path} changes {key}, which only a merged model can hold: "
                    f"`llmhost merge` it, then serve the merged model"
                )
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        weights = {}
        for name, pair in pairs.items():
            module = self.modules.get(name)
            if module is None or not isinstance(module, torch.nn.Linear) or set(pair) != {"A", "B"}:
                raise LlmhostError(f"the adapter in {path} does not fit this model (no linear layer {name})")
            dtype, device = module.weight.dtype, module.weight.device
            a = pair["A"].to(device=device, dtype=dtype)  # [r, in]
            b = (pair["B"].float() * scale).to(device=device, dtype=dtype)  # [out, r]
            weights[name] = (a.t().contiguous(), b.t().contiguous())
        for name, (a, b) in weights.items():
            if name not in self._hooked:
                self._hooked[name] = self.modules[name].register_forward_hook(self._hook(name))
            a_all, b_all, spans = self._banks.get(name, (a[:, :0], b[:0], {}))
            spans = {**spans, adapter_id: (a_all.shape[1], a_all.shape[1] + a.shape[1])}
            self._banks[name] = (torch.cat([a_all, a], dim=1), torch.cat([b_all, b], dim=0), spans)
        self._masks.clear()

    def remove(self, adapter_id: str) -> None:
        """Take the adapter's columns out of every layer's matrices."""
        import torch

        for name, (a_all, b_all, spans) in list(self._banks.items()):
            if adapter_id not in spans:
                continue
            lo, hi = spans[adapter_id]
            rest = {a: (x - (hi - lo) * (x >= hi), y - (hi - lo) * (y >= hi)) for a, (x, y) in spans.items()}
            del rest[adapter_id]
            if not rest:
                del self._banks[name]
                continue
            a_all = torch.cat([a_all[:, :lo], a_all[:, hi:]], dim=1)
            b_all = torch.cat([b_all[:lo], b_all[hi:]], dim=0)
            self._banks[name] = (a_all, b_all, rest)
        self._masks.clear()

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]) -> Iterator[None]:
        """Within this block, forward passes apply adapters[i] to row i."""
        self._rows = tuple(adapters) if any(a is not None for a in adapters) else None
        try:
            yield
        finally:
            self._rows = None

    def _mask(self, name: str, rows: tuple[str | None, ...]) -> Any:
        """[rows, 1, R]: 1 in each row's own adapter's columns of this layer, else 0."""
        mask = self._masks.get((name, rows))
        if mask is None:
            a_all, _, spans = self._banks[name]
            mask = a_all.new_zeros((len(rows), 1, a_all.shape[1]))
            for i, a in enumerate(rows):
                if a in spans:
                    lo, hi = spans[a]
                    mask[i, 0, lo:hi] = 1
            if len(self._masks) > 4096:  # compositions come and go: never let them pile up
                self._masks.clear()
            self._masks[(name, rows)] = mask
        return mask

    def _hook(self, name: str) -> Any:
        def apply(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            rows = self._rows
            if rows is None or name not in self._banks:
                return output
            a_all, b_all, _ = self._banks[name]
            x = inputs[0]  # [rows, tokens, in]
            return output + ((x @ a_all) * self._mask(name, rows)) @ b_all

        return apply


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LlmhostError(f"{path} is not a LoRA adapter: adapter_config.json unreadable ({err})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise LlmhostError(
            f"the adapter in {path} is not a plain LoRA adapter (DoRA or another kind): `llmhost merge` "
            "it, then serve the merged model"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LlmhostError(
            f"the adapter in {path} has per-layer ranks: `llmhost merge` it, then serve the merged model"
        )
    return config
