"""A llama.cpp context's slots (llama-server's `server_slot`): one `Slot` per KV stream owns
everything about its sequence, and the choices the runner makes over them are pure functions
here (which slot a prompt takes, what it keeps, which run of slots a request joins), tested
without a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmhost.engine.backends.prefix import common_prefix

#: Prompts are evaluated in blocks of this many positions, and slots share whole blocks only.
PREFILL_BLOCK = 64


def whole_blocks(n: int) -> int:
    """`n` rounded down to a whole number of prompt blocks."""
    return n // PREFILL_BLOCK * PREFILL_BLOCK


@dataclass(eq=False)
class Slot:
    """One sequence of the context, in a KV stream of its own."""

    id: int
    #: free: its cells are a prompt cache; prefilling: a request's prompt is going in (until
    #: the scheduler commits it); running: a request decodes in it.
    state: Literal["free", "prefilling", "running"] = "free"
    #: The tokens in its cells, in position order.
    tokens: list[int] = field(default_factory=list)
    #: How many of them were evaluated as a prompt (a later prompt may reuse those).
    prompted: int = 0
    #: The logits after its last prompt (its first `prompt_len` tokens) while those cells are
    #: intact: the same prompt again (a retry, a regenerated reply) decodes at once.
    first_logits: Any = None
    prompt_len: int = 0
    #: The LoRA adapter its cells were made with (None: the plain model).
    adapter: str | None = None
    #: When it last became free (least recently used first).
    idle_since: float = 0.0
    #: What it is to hold once its reply is evaluated again as prompt blocks while the engine
    #: is idle (prompt and reply); None when nothing is to be done.
    redo: list[int] | None = None

    @property
    def free(self) -> bool:
        return self.state == "free"

    def take(self, other: Slot) -> None:
        """Everything known of `other`'s cells (llama.cpp copies the cells themselves)."""
        self.tokens, self.prompted = list(other.tokens), other.prompted
        self.first_logits, self.prompt_len = other.first_logits, other.prompt_len
        self.adapter, self.idle_since, self.redo = other.adapter, other.idle_since, other.redo

    def empty(self) -> None:
        self.tokens, self.prompted, self.first_logits, self.prompt_len, self.redo = [], 0, None, 0, None

    def follows(self, ids: list[int]) -> bool:
        """Whether a prompt starts with all of this slot's last prompt (it carries on from it).
        A slot whose reply is being made again holds only part of it meanwhile: what it is to
        hold counts."""
        held = self.redo if self.redo is not None else self.tokens
        return self.prompt_len > 0 and common_prefix(held, ids) >= self.prompt_len


@dataclass
class Reuse:
    """What a slot's cells may give a later prompt on this model, here (the runner's notes say
    why): `exact` off (`--prefix-cache fast`) reuses every cell as it is; exact, it depends on
    what was measured at the first prefill."""

    exact: bool = True
    #: Every position computes alike in any batch under the reference kernels.
    invariant: bool | None = None
    #: The part of a prompt past its last whole block may be reused token by token.
    granular: bool | None = None

    def as_decoded(self, adapter: str | None) -> bool:
        """Whether cells made with `adapter` are reused as they are, decoded ones included
        (exact: where the model is `invariant`, for the plain model; LoRA's own matmuls were
        not measured)."""
        return not self.exact or (bool(self.invariant) and adapter is None)

    def partial_blocks(self, slot: Slot) -> bool:
        """Whether a slot's cells past its last whole block may be reused token by token."""
        return not self.exact or (bool(self.granular) and slot.adapter is None)

    def value(self, slot: Slot) -> int:
        """How many tokens a slot's cells can give a later request: what was evaluated as a
        prompt (with the reply, once made again), in whole blocks unless `partial_blocks`; its
        whole prompt when its logits are kept."""
        n = len(slot.redo) if slot.redo is not None else slot.prompted
        if not self.partial_blocks(slot):
            n = whole_blocks(n)
        return max(n, slot.prompt_len if slot.first_logits is not None else 0)

    def reusable(self, slot: Slot, ids: list[int], n: int, adapter: str | None) -> int:
        """How many of the `n` tokens a slot shares with a prompt it may give (at least one is
        left to evaluate: its logits start the reply): whole blocks, which a cold run evaluates
        as the same batches; and where rows are independent (`granular`, no adapter), the part
        of the prompt's last, partial block that lies in the slot's own last partial block,
        both evaluated in batches below PREFILL_BLOCK rows."""
        n = min(n, len(ids) - 1)
        if self.as_decoded(adapter):
            return n
        partial = whole_blocks(len(ids))  # where the prompt's last block starts
        own = whole_blocks(slot.prompted)  # where the slot's starts
        if self.granular and adapter is None and n > partial and own == partial:
            return n
        return whole_blocks(n)

    def rank(self, slot: Slot) -> tuple[int, float]:
        """Least value first, then least recently used: the order in which caches are given up."""
        return self.value(slot), slot.idle_since


def free_slots(slots: list[Slot]) -> list[Slot]:
    return [s for s in slots if s.free]


def taken_ids(slots: list[Slot]) -> set[int]:
    return {s.id for s in slots if not s.free}


def joins(slot: int, taken: set[int]) -> int:
    """How the number of runs of consecutive slots in `taken` changes once `slot` is taken too:
    1 (a run of its own), 0 (it extends one), -1 (it joins two)."""
    return 1 - (slot - 1 in taken) - (slot + 1 in taken)


def choose(slots: list[Slot], ids: list[int], adapter: str | None, reuse: Reuse) -> tuple[Slot, int]:
    """The free slot holding the most of prompt `ids`, and how many tokens of it: all of them
    when a slot holds this very prompt with its logits, else the longest shared prefix that
    may be reused (`Reuse.reusable`) made with the same adapter, else the slot idle longest."""
    best: Slot | None = None
    shared, oldest = 0, float("inf")
    for slot in free_slots(slots):
        same = slot.adapter == adapter
        if same and slot.first_logits is not None and slot.tokens[: slot.prompt_len] == ids:
            return slot, len(ids)
        n = common_prefix(slot.tokens[: slot.prompted], ids) if same else 0
        n = reuse.reusable(slot, ids, n, adapter)
        if n > shared or (n == shared and slot.idle_since < oldest):
            best, shared, oldest = slot, n, slot.idle_since
    assert best is not None, "no free slot (the scheduler admits only while there is room)"
    return best, shared


def place(slots: list[Slot], source: Slot, shared: int, ids: list[int], reuse: Reuse) -> tuple[Slot, bool]:
    """The free slot a request decodes in, given where its prefix lies (`source` holds `shared`
    of its prompt `ids`). llama.cpp evaluates each run of consecutive busy slots as a
    micro-batch of its own (its KV streams are viewed as one contiguous range), and a
    micro-batch costs about as much as a whole decode step: first the slot that adds no run
    (or joins two), then the one whose cache is worth the least, then `source` itself (no
    copy), then the least recently used. Taking a slot loses its value (`source`: beyond the
    prefix), except where the prompt starts with all of the slot's last prompt (a
    conversation's next turn): that slot loses at most the tail of the reply the prompt carries
    on from, and is taken before an empty one. (Moving the conversation elsewhere would spend
    the caches of short prompts, worth little each, on its stale turns.) Returns the slot and
    whether the prompt carries on from it (its cache is then stale)."""
    taken = taken_ids(slots)

    def key(slot: Slot) -> tuple[int, int, int, float, bool]:
        follows = slot.follows(ids)
        loss = 0 if follows else reuse.value(slot) - (shared if slot is source else 0)
        rank = 0 if slot is source and shared else 1 if follows else 2  # a source of nothing is any slot
        return (joins(slot.id, taken), loss, rank, slot.idle_since, follows)

    keys = {slot.id: key(slot) for slot in free_slots(slots)}
    best = min(keys, key=keys.__getitem__)
    return slots[best], keys[best][-1]


def spare_for(slots: list[Slot], slot: Slot, keep: Slot, reuse: Reuse) -> Slot | None:
    """Before the free `slot` is overwritten: the free slot (not `keep`) its cache should move
    to, the one worth the least, if that one is worth less; None to let the cache go."""
    if not reuse.value(slot):
        return None
    spare = [s for s in free_slots(slots) if s is not slot and s is not keep]
    low = min(spare, key=reuse.rank, default=None)
    return low if low is not None and reuse.value(low) < reuse.value(slot) else None


def compaction(slots: list[Slot], reuse: Reuse) -> tuple[Slot, Slot] | None:
    """A running slot to move into a free one, where that lowers the number of runs of busy
    slots (each a micro-batch per step); None when no move does. A move is a stream copy
    (≈5 ms once); a micro-batch costs 3-8 ms every step."""
    taken = taken_ids(slots)
    moves = []  # (change in the number of runs, what dst holds, src id, dst id)
    for src in (s for s in slots if s.state == "running"):
        rest = taken - {src.id}
        left = joins(src.id, rest)  # the runs that go with src
        moves += [(joins(dst.id, rest) - left, reuse.rank(dst), src.id, dst.id) for dst in free_slots(slots)]
    best = min(moves, default=None)
    if best is None or best[0] >= 0:
        return None
    return slots[best[2]], slots[best[3]]


def next_redo(slots: list[Slot]) -> Slot | None:
    """The free slot whose reply is made again next: the one that became free first."""
    waiting = [s for s in slots if s.redo is not None]
    return min(waiting, key=lambda s: (s.idle_since, s.id), default=None)
