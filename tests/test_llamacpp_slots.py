"""The llama.cpp runner's choices over its slots (engine/backends/llamacpp/slots.py): pure
functions of the slots' state, checked here without a model."""

from __future__ import annotations

from llmhost.engine.backends.llamacpp.slots import (
    PREFILL_BLOCK,
    Reuse,
    Slot,
    choose,
    compaction,
    joins,
    next_redo,
    place,
    spare_for,
)

B = PREFILL_BLOCK
EXACT = Reuse(exact=True, invariant=False, granular=False)  # whole blocks only (K-quants)
FAST = Reuse(exact=False)  # every cell as it is


def slot(i: int, tokens: list[int] | None = None, *, idle: float = 0.0, logits: bool = False, **kw) -> Slot:
    tokens = tokens or []
    s = Slot(i, tokens=list(tokens), prompted=len(tokens), idle_since=idle, **kw)
    if logits:
        s.first_logits, s.prompt_len = object(), len(tokens)
    return s


def test_a_prompt_takes_the_slot_sharing_its_longest_prefix_in_whole_blocks():
    base = list(range(3 * B))
    slots = [slot(0, base[: B + 10], idle=1), slot(1, base[: 2 * B + 5], idle=2), slot(2, idle=0)]
    chosen, shared = choose(slots, base, None, EXACT)
    assert chosen is slots[1] and shared == 2 * B  # whole blocks of what it holds
    chosen, shared = choose(slots, base, None, FAST)
    assert chosen is slots[1] and shared == 2 * B + 5  # fast: every cell
    chosen, shared = choose(slots, [999, *base], None, EXACT)
    assert chosen is slots[2] and shared == 0  # nothing shared: the slot idle longest


def test_the_same_prompt_with_kept_logits_reuses_all_of_it():
    ids = list(range(B + 3))
    slots = [slot(0, ids, logits=True), slot(1)]
    assert choose(slots, ids, None, EXACT) == (slots[0], len(ids))
    assert choose(slots, ids, "lora1", EXACT)[1] == 0  # cells made without the adapter


def test_at_least_one_prompt_token_is_left_to_evaluate():
    ids = list(range(2 * B))
    slots = [slot(0, [*ids, 7])]
    assert choose(slots, ids, None, FAST)[1] == len(ids) - 1
    assert choose(slots, ids, None, EXACT)[1] == B  # whole blocks below len(ids) - 1


def test_granular_reuse_takes_part_of_the_last_block_only_where_both_end_in_it():
    held = list(range(B + 20))
    granular = Reuse(exact=True, invariant=False, granular=True)
    ids = [*held[: B + 10], 999, 998]
    assert granular.reusable(slot(0, held), ids, B + 10, None) == B + 10
    assert granular.reusable(slot(0, held), ids, B + 10, "lora1") == B  # LoRA: whole blocks
    longer = slot(0, list(range(2 * B + 1)))  # its own last block starts elsewhere
    assert granular.reusable(longer, ids, B + 10, None) == B


def test_a_busy_run_is_extended_before_a_new_run_is_started():
    assert joins(2, {1}) == 0 and joins(2, set()) == 1 and joins(2, {1, 3}) == -1
    slots = [slot(0, idle=1), Slot(1, state="running"), slot(2, idle=2), slot(3, idle=0)]
    chosen, stale = place(slots, slots[3], 0, [5, 6], EXACT)
    assert chosen.id in (0, 2) and not stale  # next to the running slot 1, not slot 3


def test_a_conversations_next_turn_stays_in_its_slot():
    prompt = list(range(B + 5))
    first = slot(0, [*prompt, 70, 71], logits=True)
    first.prompt_len = len(prompt)
    slots = [first, slot(1)]
    turn = [*prompt, 70, 71, 80]
    source, shared = choose(slots, turn, None, EXACT)
    chosen, stale = place(slots, source, shared, turn, EXACT)
    assert chosen is first and stale


def test_a_cache_worth_more_moves_to_a_slot_worth_less_before_it_is_overwritten():
    big, small, keep = slot(0, list(range(3 * B))), slot(1, list(range(B))), slot(2)
    slots = [big, small, keep]
    assert spare_for(slots, big, keep, EXACT) is small
    assert spare_for(slots, small, keep, EXACT) is None  # `keep` excluded, nothing worth less
    assert spare_for([slot(0), slot(1)], slot(0), slot(1), EXACT) is None  # nothing to keep


def test_a_gap_between_running_slots_is_closed_by_one_move():
    slots = [Slot(0, state="running"), slot(1), Slot(2, state="running"), slot(3)]
    src, dst = compaction(slots, EXACT)
    assert {src.id, dst.id} in ({0, 1}, {2, 1}) and dst.free
    assert compaction([Slot(0, state="running"), Slot(1, state="running"), slot(2)], EXACT) is None


def test_replies_are_made_again_in_the_order_their_slots_became_free():
    a, b = slot(0, [1, 2], idle=5.0), slot(1, [3], idle=2.0)
    a.redo, b.redo = [1, 2, 3], [3, 4]
    assert next_redo([a, b]) is b
    b.redo = None
    assert next_redo([a, b]) is a and next_redo([slot(0)]) is None


def test_taking_a_slot_copies_everything_known_of_its_cells():
    src, dst = slot(0, [1, 2, 3], idle=4.0, logits=True, adapter="lora1"), Slot(1, state="free")
    src.redo = [1, 2, 3, 4]
    dst.take(src)
    assert (dst.tokens, dst.prompted, dst.prompt_len, dst.adapter, dst.redo) == (
        [1, 2, 3],
        3,
        3,
        "lora1",
        [1, 2, 3, 4],
    )
    assert dst.tokens is not src.tokens and dst.id == 1
    dst.empty()
    assert (dst.tokens, dst.prompted, dst.first_logits, dst.redo) == ([], 0, None, None)
