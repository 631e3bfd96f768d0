"""Driving an engine's batch runner directly, without the scheduler: what the runner tests share."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def greedy(runner: Any, ids: list[int], n: int) -> tuple[list[int], Any]:
    """Greedy decoding of n tokens of `ids` on a bare runner; the tokens and the first logits."""
    req = SimpleNamespace(prompt_ids=ids, seq=SimpleNamespace(cached_tokens=0), adapter=None, last_token=-1)
    first = logits = runner.prefill(req)
    runner.commit_prefill()
    out = []
    for _ in range(n):
        req.last_token = int(logits.argmax())
        out.append(req.last_token)
        logits = runner.step([req])[0]
    runner.drop([])
    return out, first
