"""Sampling without sorting the vocabulary: the tokens top-k / top-p keep are the ones a full sort
keeps, and sampling only ever picks among them."""

from __future__ import annotations

import torch

from llmhost.engine.params import GenerationParams
from llmhost.engine.sampling import _nucleus, sample_next

VOCAB = 49152


def full_sort_keeps(logits: torch.Tensor, top_p: float, top_k: int) -> set[int]:
    """The reference: mask to the top k, sort everything, keep while the mass before < top_p."""
    if top_k:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ordered, order = torch.sort(logits, descending=True)
    probs = ordered.softmax(-1)
    keep = (probs.cumsum(-1) - probs) < top_p
    return set(order[keep].tolist())


def model_like(seed: int, peak: float) -> torch.Tensor:
    """Logits shaped like a language model's: a few likely tokens over a long flat tail."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g)
    logits[torch.randint(0, VOCAB, (20,), generator=g)] += peak * torch.rand(20, generator=g)
    return logits


def test_the_kept_tokens_are_the_full_sorts() -> None:
    """The same set, but for float rounding at its edge: the cumulative sums add in another
    order, so a token whose mass before it is within rounding of top_p may go either way."""
    for seed in range(30):
        for peak in (4.0, 10.0, 20.0):
            logits = model_like(seed, peak)
            for top_p in (0.5, 0.9, 0.95):
                for top_k in (0, 40):
                    _, ids = _nucleus(logits, top_p, top_k)
                    mine, theirs = set(ids.tolist()), full_sort_keeps(logits, top_p, top_k)
                    edge = mine ^ theirs
                    assert len(edge) <= 2, (seed, peak, top_p, top_k, len(edge))
                    if edge:  # only ever the least likely of the kept
                        floor = float(logits[list(mine & theirs)].min())
                        assert all(float(logits[t]) <= floor + 1e-4 for t in edge)


def test_a_flat_distribution_grows_the_candidates_to_the_whole_nucleus() -> None:
    logits = torch.zeros(VOCAB)  # every token equally likely: the nucleus is 90% of the vocabulary
    _, ids = _nucleus(logits, 0.9, 0)
    assert abs(len(ids) - 0.9 * VOCAB) <= 1


def test_samples_stay_in_the_nucleus_and_a_seed_repeats() -> None:
    logits = model_like(1, 10.0)
    allowed = full_sort_keeps(logits / 0.7, 0.9, 0)
    params = GenerationParams(temperature=0.7, top_p=0.9)
    picks = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(picks) <= allowed and len(set(picks)) > 1
    again = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert picks == again
