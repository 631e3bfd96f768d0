"""Sampling without sorting the vocabulary: the tokens top-k / top-p keep are the ones a full sort
keeps (numpy's way on the CPU, torch's on a GPU), and sampling only ever picks among them, as
often as their probabilities say."""

from __future__ import annotations

import pytest
import torch

from llmhost.engine.params import GenerationParams
from llmhost.engine.sampling import _kept, _nucleus, sample_next


def torch_way(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    return _nucleus(logits, top_p, top_k)[1]


def numpy_way(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    return torch.from_numpy(_kept(logits.numpy(), top_p, top_k)[0])


WAYS = pytest.mark.parametrize("keep", [torch_way, numpy_way], ids=["torch", "numpy"])

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


@WAYS
def test_the_kept_tokens_are_the_full_sorts(keep) -> None:
    """The same set, but for float rounding at its edge: the cumulative sums add in another
    order, so a token whose mass before it is within rounding of top_p may go either way."""
    for seed in range(30):
        for peak in (4.0, 10.0, 20.0):
            logits = model_like(seed, peak)
            for top_p in (0.5, 0.9, 0.95):
                for top_k in (0, 40):
                    ids = keep(logits, top_p, top_k)
                    mine, theirs = set(ids.tolist()), full_sort_keeps(logits, top_p, top_k)
                    edge = mine ^ theirs
                    assert len(edge) <= 2, (seed, peak, top_p, top_k, len(edge))
                    if edge:  # only ever the least likely of the kept
                        floor = float(logits[list(mine & theirs)].min())
                        assert all(float(logits[t]) <= floor + 1e-4 for t in edge)


@WAYS
def test_a_flat_distribution_grows_the_candidates_to_the_whole_nucleus(keep) -> None:
    logits = torch.zeros(VOCAB)  # every token equally likely: the nucleus is 90% of the vocabulary
    assert abs(len(keep(logits, 0.9, 0)) - 0.9 * VOCAB) <= 1
    assert len(keep(logits, 0.9, 40)) == 36  # the top 40, then 90% of them


def test_samples_stay_in_the_nucleus_and_a_seed_repeats() -> None:
    logits = model_like(1, 10.0)
    allowed = full_sort_keeps(logits / 0.7, 0.9, 0)
    params = GenerationParams(temperature=0.7, top_p=0.9)
    picks = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(picks) <= allowed and len(set(picks)) > 1
    again = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert picks == again


@pytest.mark.parametrize("top_k", [0, 3])
def test_samples_come_as_often_as_their_probability(top_k) -> None:
    """Four allowed tokens (the rest masked, as a grammar does) with probabilities .5, .3, .15 and
    .05: top_p 0.9 (or top_k 3) keeps three, each drawn as often as its share of their mass."""
    logits = torch.full((VOCAB,), float("-inf"))
    ids = [7, 1234, 40000, 5]
    logits[ids] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = GenerationParams(temperature=1.0, top_p=1.0 if top_k else 0.9, top_k=top_k)
    g = torch.Generator().manual_seed(0)
    picks = [sample_next(logits, params, g) for _ in range(6000)]
    assert set(picks) == set(ids[:3])
    for token, p in zip(ids, (0.5, 0.3, 0.15), strict=False):
        assert abs(picks.count(token) / len(picks) - p / 0.95) < 0.025, (token, picks.count(token))


def test_the_whole_vocabulary_is_sampled_as_its_softmax() -> None:
    """top_p 1 and no top_k: every token may come, as often as its probability."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(10)  # 40 tokens, 4 levels
    params = GenerationParams(temperature=1.0, top_p=1.0)
    g = torch.Generator().manual_seed(0)
    picks = torch.tensor([sample_next(logits, params, g) for _ in range(8000)]) % 4
    probs = torch.tensor([2.0, 1.0, 0.0, -1.0]).softmax(-1)
    for level in range(4):
        assert abs(float((picks == level).float().mean()) - float(probs[level])) < 0.02


def test_greedy_takes_the_first_of_equal_maxima_on_every_device_path() -> None:
    logits = torch.zeros(VOCAB)
    logits[[300, 200, 900]] = 5.0
    assert sample_next(logits, GenerationParams(temperature=0), None) == 200
