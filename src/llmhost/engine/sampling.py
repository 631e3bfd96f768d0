"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a
repetition penalty. torch is imported by the caller; this module only receives tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmhost.engine.params import GenerationParams

if TYPE_CHECKING:
    import torch

#: mlx-lm's shape: the ids generated so far and one row of logits in, logits out.
LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, as in transformers and the CTRL paper: positive scores / penalty, negative × it."""
    scores = logits.gather(0, seen)
    scores = scores.where(scores < 0, scores / penalty).where(scores >= 0, scores * penalty)
    logits.scatter_(0, seen, scores)


def sample_next(
    logits: torch.Tensor,
    params: GenerationParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
    processors: Sequence[LogitsProcessor] = (),
    generated: list[int] | None = None,
) -> int:
    """Pick the next token id from one row of logits (shape [vocab])."""
    import torch

    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        apply_repetition_penalty(logits, seen, params.repetition_penalty)
    for processor in processors:
        logits = processor(generated or [], logits)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log probability of `token` and its `top` most likely alternatives, from the raw
    logits (before temperature, penalties and masks, as OpenAI and vLLM report them)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), -1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return float(logprobs[token]), alternatives
