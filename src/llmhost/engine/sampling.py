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
    vocab = logits.numel()
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if params.top_p >= 1.0 and not top_k:
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    values, ids = _nucleus(logits, params.top_p, top_k)
    return int(ids[torch.multinomial(values.softmax(-1), 1, generator=generator)])


#: Candidates looked at first for top-p; most replies' nucleus is far smaller than this.
_FIRST_K = 64


def _nucleus(logits: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and ids of the tokens top-k then top-p keep, most likely first: the smallest set
    whose probability reaches top_p (the first always stays). Found among the `k` most likely
    (k grown ×8 until their probability reaches top_p), not by sorting the whole vocabulary: the
    same set a full sort gives, at a fraction of its cost per token."""
    import torch

    vocab = logits.numel()
    if top_k:  # probabilities among the top k, as if the rest were masked
        values, ids = torch.topk(logits, top_k)
        total = torch.logsumexp(values, -1)
    else:
        total = torch.logsumexp(logits, -1)
        k = min(_FIRST_K, vocab)
        while True:
            values, ids = torch.topk(logits, k)
            if k == vocab or float(torch.exp(values - total).sum()) >= top_p:
                break
            k = min(vocab, k * 8)
    if top_p < 1.0:
        probs = torch.exp(values - total)
        # drop a token when the tokens before it already reach top_p
        keep = int(((probs.cumsum(-1) - probs) < top_p).sum())
        values, ids = values[: max(1, keep)], ids[: max(1, keep)]
    return values, ids


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
