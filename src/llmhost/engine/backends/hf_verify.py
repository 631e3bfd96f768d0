"""Speculation on the transformers runner (speculation.py): a verify pass over its left-padded
batch, the rollback of what was not sampled, and what the first prefill measures. The runner's
batch state is read and written here as its own methods would (`runner._cache`, `_mask`,
`_rows`, `_dead`)."""

from __future__ import annotations

from typing import Any


def verify(runner: Any, reqs: list[Any], drafts: list[list[int]]) -> list[Any]:
    """One pass over each row's last token and its proposal, padded to the longest (masked);
    per row, the logits of each of its positions."""
    import torch

    trim(runner)
    rows = [[r.last_token, *d] for r, d in zip(reqs, drafts, strict=True)]
    width = max(map(len, rows))
    runner._dead = [width - len(row) for row in rows]
    ids = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], device=runner.device)
    starts = [len(tokens) for tokens, _, _ in runner._rows]
    positions = torch.tensor([[n + i for i in range(width)] for n in starts], device=runner.device)
    new = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=runner.device)
    runner._mask = torch.cat([runner._mask, new], dim=1)
    adapters = [r.adapter for r in reqs]
    out = runner._forward(
        ids, runner._cache, adapters, width, attention_mask=runner._mask, position_ids=positions
    )
    for (tokens, _, _), row in zip(runner._rows, rows, strict=True):
        tokens.extend(row)
    return [out.logits[i, : len(row)] for i, row in enumerate(rows)]


def rollback(runner: Any, row: int, n: int) -> None:
    """Drop a row's last `n` positions and its padding from the last verify pass: the row's
    cells move right, and it is left-padded again (as every row is)."""
    import torch

    cut = n + runner._dead[row]
    if n:
        del runner._rows[row][0][-n:]
    if not cut:
        return
    for layer in runner._cache.layers:
        for t in (layer.keys, layer.values):
            t[row] = torch.cat([torch.zeros_like(t[row, :, :cut]), t[row, :, :-cut]], dim=1)
    runner._mask[row] = torch.cat([torch.zeros_like(runner._mask[row, :cut]), runner._mask[row, :-cut]])


def trim(runner: Any) -> None:
    """Drop the leading columns that are padding in every row (rows rolled back)."""
    if runner._mask is not None and (lead := int(runner._mask.any(0).int().argmax())):
        for layer in runner._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        runner._mask = runner._mask[:, lead:]


def measure_passes(runner: Any) -> tuple[Any, bool]:
    """At the first prefill: one pass's time over n positions of a sequence a block long (the
    least of 3), and whether 8 positions evaluated in one pass give the logits 8 decode steps
    give (then a greedy reply is the same tokens with speculation)."""
    import time

    import torch

    from llmhost.engine.speculation import BatchCost

    vocab = runner.model.get_input_embeddings().weight.shape[0]
    probe = [(i * 7919) % max(vocab - 256, 1) + min(128, vocab // 2) for i in range(runner.block + 16)]
    cache = runner.new_cache()  # the runner's type: q8_0 costs more per pass
    ids = torch.tensor([probe], device=runner.device)
    runner._forward(ids[:, : runner.block], cache, [None])
    rest = ids[:, runner.block : runner.block + 8]
    stepped = [runner._forward(rest[:, i : i + 1], cache, [None]).logits[0, -1] for i in range(8)]
    cache.crop(-8)
    exact = torch.equal(torch.stack(stepped), runner._forward(rest, cache, [None], 8).logits[0])
    cache.crop(-8)
    sizes, seconds = [1, 2, 4, 8, 16], []
    for n in sizes:
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            runner._forward(ids[:, runner.block : runner.block + n], cache, [None], n)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - began)
            cache.crop(-n)
        seconds.append(best)
    return BatchCost(sizes, seconds), exact
