"""Prompt-lookup speculation: guess a sequence's next tokens from its own text, check them all in
one forward pass.

A decode step on a CPU (or a GPU at batch 1) costs about one read of the weights, whatever few
positions it evaluates: a reply that copies the prompt (a file edited, a passage quoted, a JSON
extraction) can be checked several tokens at a time. `Lookup` proposes the tokens that followed
the latest earlier occurrence of the sequence's last n tokens (n from NGRAM_MAX down to
NGRAM_MIN), `Drafter` decides how many to propose from the acceptance it has seen, and `plan`
decides, for a whole batch, how far to speculate from the runner's measured cost of a batch of
so many positions.

Verification is the scheduler's: each proposed position's logits are sampled exactly as a plain
decode step samples them (same processors, grammar, generator), and a proposal is kept while the
sampled token equals it. For a proposal that is one token with certainty (prompt lookup's), this
is the standard rejection-sampling rule (accept d with probability p(d), else sample from p
without d), so the output distribution is unchanged; greedy output and seeded sampling give the
very tokens plain decoding gives where the runner computes a position alike in any batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["auto", "ngram", "draft", "off"]
#: A token a draft model is still to fill in (`plan` decides how many it drafts).
TO_DRAFT = -1

#: The longest and shortest suffix looked up (tokens): longer matches first, they guess better.
NGRAM_MAX = 4
NGRAM_MIN = 2
#: Most tokens proposed for one sequence in one step.
DRAFT_MAX = 8
#: Acceptance assumed before a sequence has any history, worth PRIOR_TRIALS trials (an
#: optimistic start: a wrong guess costs one pass, and the estimate follows what happens).
FIRST_ACCEPTANCE = 0.8
PRIOR_TRIALS = 2.0
#: How much of a sequence's acceptance history each new step keeps.
ACCEPTANCE_DECAY = 0.9
#: Steps a sequence waits before proposing again once speculation stopped paying for it; the
#: wait doubles while proposals keep failing (a reply with nothing to copy stops trying).
BACK_OFF_STEPS = 16
MAX_BACK_OFF_STEPS = 512


class Lookup:
    """An index of a sequence's n-grams: which position each last ended at, kept as tokens come."""

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        #: n-gram → the position of its last token, for n-grams ending before the last token
        #: (the sequence's own suffix is never its own match)
        self._ends: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens) - 1  # the previous last token's n-grams become matchable
            if end >= 0:
                for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                    if end + 1 >= n:
                        self._ends[tuple(self.tokens[end + 1 - n : end + 1])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix
        found (empty when none of NGRAM_MIN tokens or more recurs)."""
        if k <= 0:
            return []
        for n in range(min(NGRAM_MAX, len(self.tokens)), NGRAM_MIN - 1, -1):
            end = self._ends.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end + 1 : end + 1 + k]
        return []


@dataclass
class Drafter:
    """One sequence's speculation: its lookup index, how often its guesses come true, and the
    reply's counts.

    Acceptance is the chance that a proposed token is sampled given the ones before it were
    (the geometric model `expected_tokens` uses). Each step's check is a run of trials that ends
    at the first rejection: its estimate is accepted / (accepted + rejections), over recent steps
    (counts decay by ACCEPTANCE_DECAY a step), from a prior of FIRST_ACCEPTANCE. Proposals that
    copy the prompt tend to be all right or wrong at once, which accepted / proposed would
    underrate."""

    #: The sequence's n-gram index; None where the engine's draft model proposes (`--speculative
    #: draft`)
    lookup: Lookup | None
    #: `ngram` asked for: it proposes wherever the lookup finds a match, as far as its acceptance
    #: makes worthwhile if a pass cost nothing more per position (the batch rule is not asked)
    forced: bool = False
    hits: float = PRIOR_TRIALS * FIRST_ACCEPTANCE  # decayed accepted tokens
    trials: float = PRIOR_TRIALS  # decayed accepted tokens plus rejections
    waiting: int = 0  # steps left before proposing again
    pause: int = BACK_OFF_STEPS  # the next back-off's length: doubles while proposals keep failing
    #: After a back-off: the next proposal is made whatever the rule says, as long as it would be
    #: at the prior's acceptance (a reply that turns to copying shows it in one step, where a
    #: one-token probe would need many)
    probing: bool = False
    #: Tokens the reply may still add after the next one (a proposal never goes past them: the
    #: cells for them are all the request was given)
    left: int = DRAFT_MAX

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    @property
    def drafted_by_model(self) -> bool:
        return self.lookup is None

    def candidates(self) -> list[int]:
        """What the sequence could propose this step (DRAFT_MAX at most; none while backing off)."""
        if self.waiting:
            self.waiting -= 1
            self.probing = not self.waiting
            return []
        most = min(DRAFT_MAX, self.left)
        return [TO_DRAFT] * most if self.lookup is None else self.lookup.propose(most)

    def settle(self, proposed: int, accepted: int) -> None:
        """After a step: the first `accepted` of the `proposed` tokens were sampled."""
        if proposed:
            if self.probing and accepted == proposed:  # the reply turned to copying: start afresh
                self.hits, self.trials = PRIOR_TRIALS * FIRST_ACCEPTANCE, PRIOR_TRIALS
            self.probing = False
            self.hits = self.hits * ACCEPTANCE_DECAY + accepted
            self.trials = self.trials * ACCEPTANCE_DECAY + accepted + (accepted < proposed)
            if accepted:
                self.pause = BACK_OFF_STEPS

    def back_off(self) -> None:
        """Speculation does not pay at this acceptance: stop for a while (longer each time in a
        row), then propose once more to see whether it pays again (`probing`)."""
        self.waiting, self.pause = self.pause, min(2 * self.pause, MAX_BACK_OFF_STEPS)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one step yields when `k` are proposed and each is right with probability
    `acceptance` given the ones before it were: 1 + a + a² + … + a^k."""
    return sum(acceptance**i for i in range(k + 1))


@dataclass
class BatchCost:
    """A runner's measured time for one forward pass over n positions (a step of n rows, or a
    row and its proposal), at a few sizes; between and beyond them, linear."""

    sizes: list[int]
    seconds: list[float]

    def __call__(self, n: int) -> float:
        i = min(max(bisect.bisect_left(self.sizes, n), 1), len(self.sizes) - 1)
        (n0, n1), (t0, t1) = self.sizes[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), 1e-9)


def plan(
    drafters: Sequence[Drafter | None], cost: BatchCost, room: int, draft_cost: BatchCost | None = None
) -> list[list[int]]:
    """Each row's proposal for this step (empty: it decodes one token). One draft length k is
    chosen for the whole batch (llama.cpp evaluates unequal rows in more micro-batches), the one
    that yields the most tokens per second by the measured cost: the tokens the rows are expected
    to gain over the time of a batch of their positions, against a plain step's rows over a plain
    step's time. With one row that is speculation while it pays; with many rows, whose plain step
    already reads the weights for all of them, only while the extra positions cost little. A row
    whose own best k is 0 backs off (`Drafter.back_off`). A forced row (`ngram`) proposes at least
    its own best k of 1 or more, a probing one its best k at the prior's acceptance. `room`: most
    positions in one pass. A draft model's rows (their proposals are TO_DRAFT placeholders the
    runner fills in) add k passes of the draft model over them (`draft_cost`) to the time."""
    rows = len(drafters)
    guesses = [d.candidates() if d is not None else [] for d in drafters]
    floor = [0] * rows  # the least each row proposes (forced and probing rows: their own best)
    for i, d in enumerate(drafters):
        if d is None or not guesses[i]:
            continue
        insist = d.forced or d.probing
        drafting = draft_cost if d.drafted_by_model else None
        acceptance = max(d.acceptance, FIRST_ACCEPTANCE) if d.probing else d.acceptance
        own = best_alone(acceptance, cost, len(guesses[i]), at_least_one=insist, draft_cost=drafting)
        if not own:  # it could not gain alone at its acceptance: it stops proposing for a while
            d.back_off()
            guesses[i] = []
        floor[i] = own if insist else 0
    best_k, best_rate = 0, rows / cost(rows)
    for k in range(1, max(map(len, guesses), default=0) + 1):
        lengths = [min(k, len(g)) for g in guesses]
        if rows + sum(lengths) > room:
            break
        gained = sum(
            expected_tokens(d.acceptance, n) if d is not None else 1.0
            for d, n in zip(drafters, lengths, strict=True)
        )
        by_model = [
            n for d, n in zip(drafters, lengths, strict=True) if d is not None and d.drafted_by_model and n
        ]
        drafting = max(by_model) * draft_cost(len(by_model)) if by_model and draft_cost else 0.0
        rate = gained / (cost(rows + sum(lengths)) + drafting)
        if rate > best_rate:
            best_k, best_rate = k, rate
    drafts = [g[: max(best_k, least)] for g, least in zip(guesses, floor, strict=True)]
    while rows + sum(map(len, drafts)) > room:  # forced rows too fit one pass
        longest_row = max(range(rows), key=lambda i: len(drafts[i]))
        drafts[longest_row] = drafts[longest_row][:-1]
    return drafts


def best_alone(
    acceptance: float,
    cost: BatchCost,
    longest: int,
    at_least_one: bool = False,
    draft_cost: BatchCost | None = None,
) -> int:
    """The draft length (up to `longest`) that gains one sequence the most tokens per second at
    this acceptance (with a draft model's k passes when `draft_cost`); 0 when none gains (1 or
    more when `at_least_one`)."""
    drafting = draft_cost(1) if draft_cost else 0.0
    rates = {k: expected_tokens(acceptance, k) / (cost(1 + k) + k * drafting) for k in range(1, longest + 1)}
    best = max(rates, key=rates.__getitem__, default=0)
    return best if best and (at_least_one or rates[best] > 1 / cost(1)) else 0
