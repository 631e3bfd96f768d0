"""A request inside the scheduler (what it holds while it decodes) and what a runner does for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmhost.engine.sampling import sample_next, token_logprobs
from llmhost.engine.sequence import SequenceState
from llmhost.engine.speculation import Drafter


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    seq: SequenceState
    deliver: Callable[[object], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    generator: Any = None
    seen: list[int] = field(default_factory=list)
    last_token: int = -1
    #: The LoRA adapter this request decodes with (its id in the runner); None: the base model.
    adapter: str | None = None
    #: Its prompt-lookup speculation (None: it decodes one token per step).
    drafter: Drafter | None = None

    def pick(self, logits: Any, seen: Any) -> None:
        """Sample the next token from this request's row of logits and hand its chunk over."""
        seq = self.seq
        params = seq.params
        token = sample_next(logits, params, self.generator, seen, seq.processors, seq.generated)
        scored = None if params.logprobs is None else token_logprobs(logits, token, params.logprobs)
        self.last_token = token
        if params.repetition_penalty != 1.0:
            self.seen.append(token)
        if self.drafter is not None and self.drafter.lookup is not None:
            self.drafter.lookup.extend((token,))
        self.deliver(seq.add(token, scored))

    def pick_verified(self, logits: Any, draft: list[int], seen: Callable[[], Any]) -> int:
        """Sample position after position of a verified proposal (`logits`: one row for the last
        token and one per proposed token), each exactly as a plain step would, while the token
        sampled equals the one proposed; returns how many proposed tokens were rejected (their
        cells are to be dropped). Sampling then comparing is the rejection-sampling rule for a
        proposal made with certainty (`speculation`'s notes)."""
        assert self.drafter is not None
        self.seq.drafted += len(draft)
        for i in range(len(draft) + 1):
            if i:
                self.seq.accepted += 1  # draft[i - 1] was sampled: its cell stays
            self.pick(logits[i], seen())
            if self.seq.finished or i == len(draft) or self.last_token != draft[i]:
                self.drafter.settle(len(draft), i)
                return len(draft) - i
        raise AssertionError("unreachable: the loop returns at its last position")


class BatchRunner(Protocol):
    """Model-specific half of batching: the engine supplies it. A runner may also prefill in
    chunks: `prefill_chunk(req)` evaluates the next chunk of the prompt and returns None until
    the last, whose logits it returns as `prefill` does; `abort_prefill()` gives up the one in
    progress (its request was cancelled). `torch_threads`, if a runner has it, is the number of
    intra-op threads torch uses on the inference thread. A runner may have work for idle times:
    `idle_work(interrupt)` does one piece of it and returns whether more remains; it is called
    only while nothing runs or waits, and stops early once `interrupt()` is true.

    A runner that can check proposed tokens (speculation) has `verify(reqs, drafts)`: one
    forward pass over each row's last token and its proposal, returning per row the logits of
    each of those positions ([1 + len(draft), vocab]); `rollback(row, n)` then drops a row's
    last n cells. It has `batch_cost` (a `speculation.BatchCost` measured at its first prefill),
    `max_positions` (most positions one pass takes) and `verifies_exactly` (whether a position
    computes alike in a verify batch and in a decode step: then greedy replies are the same
    tokens with and without speculation)."""

    max_batch: int
    device: Any

    def prefill(self, req: Request) -> Any:
        """Run the prompt alone; return the last-position logits (shape [vocab]) and keep its cache."""

    def commit_prefill(self) -> None:
        """Merge the request just prefilled into the running batch."""

    def step(self, reqs: list[Request]) -> Any:
        """One decoding step for every running request; logits of shape [len(reqs), vocab]."""

    def drop(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch."""

    def has_room(self, req: Request) -> bool:
        """Whether `req` can join the running batch now (a fixed-size KV cache may be full)."""
