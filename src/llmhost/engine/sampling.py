"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a
repetition penalty. torch is imported by the caller; this module only receives tensors.

On the CPU the choice is made in numpy on the tensor's own memory: torch's CPU kernels for one
49k-element row (argmax, logsumexp, topk) cost 40-100 µs each on one thread, numpy's 3-40 µs,
and every microsecond here is one the decode loop waits (measured: top-p sampling took 6% of a
single stream's decode time in torch, its share of a step 260 µs against greedy's 57)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmhost.engine.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
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
    cpu = logits.device.type == "cpu"
    if params.greedy:
        return int(logits.numpy().argmax()) if cpu else int(logits.argmax())
    if cpu:
        return _sample_cpu(logits.numpy() / params.temperature, params, generator)
    logits = logits / params.temperature
    vocab = logits.numel()
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if params.top_p >= 1.0 and not top_k:
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    values, ids = _nucleus(logits, params.top_p, top_k)
    return int(ids[torch.multinomial(values.softmax(-1), 1, generator=generator)])


def _sample_cpu(z: np.ndarray, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Sample from temperature-scaled logits `z` after top-k / top-p: the uniform draw comes from
    the request's torch generator (a seed repeats), the token from the kept tokens' cumulative
    probabilities."""
    import numpy as np
    import torch

    top_k = params.top_k if 0 < params.top_k < z.size else 0
    if params.top_p >= 1.0 and not top_k:  # the whole vocabulary, in any order
        ids, weights = None, np.exp(z - z.max())
    else:
        ids, weights = _kept(z, params.top_p, top_k)
    cumulative = np.cumsum(weights, dtype=np.float64)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    i = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(weights) - 1)
    return i if ids is None else int(ids[i])


#: Tokens at least this likely relative to the most likely are looked at first for top-p / top-k
#: (lowered ×1e-4 until enough): most replies' nucleus lies far above it.
_FIRST_RATIO = 1e-4


def _kept(z: np.ndarray, top_p: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's `_nucleus`: the ids of the tokens top-k then top-p keep, most likely first, and
    their probabilities relative to the most likely (unnormalized). Found among the tokens above
    a probability threshold, lowered until they hold the top k, or top_p of the mass (then the
    whole nucleus is among them: they are the most likely), not by sorting the vocabulary."""
    import numpy as np

    e = np.exp(z - z.max())
    mass = float(e.sum(dtype=np.float64))
    need = top_p * mass
    ratio = _FIRST_RATIO
    while True:
        ids = np.flatnonzero(e >= ratio)
        enough = len(ids) >= top_k if top_k else float(e[ids].sum(dtype=np.float64)) >= need
        if enough or ratio == 0.0:
            break
        ratio = ratio * 1e-4 if ratio > 1e-30 else 0.0
    ids = ids[np.argsort(-e[ids], kind="stable")]
    if top_k:
        ids = ids[:top_k]
    weights = e[ids]
    if top_p < 1.0:  # among the top k, as if the rest were masked; else among all
        total = weights.sum(dtype=np.float64) if top_k else mass
        probs = weights.astype(np.float64) / total  # float32 sums drift over thousands of tokens
        # drop a token when the tokens before it already reach top_p
        keep = max(1, int(((np.cumsum(probs) - probs) < top_p).sum()))
        ids, weights = ids[:keep], weights[:keep]
    return ids, weights


#: Candidates looked at first for top-p; most replies' nucleus is far smaller than this.
_FIRST_K = 64


def _nucleus(logits: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On a GPU: the logits and ids of the tokens top-k then top-p keep, most likely first: the
    smallest set whose probability reaches top_p (the first always stays). Found among the `k` most likely
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
