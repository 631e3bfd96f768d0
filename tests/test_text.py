"""Detokenization, stop strings and per-sequence rules on scripted token streams (real tokenizer)."""

from __future__ import annotations

import pytest

from llmhost.engine import GenerationParams
from llmhost.engine.sequence import SequenceState
from llmhost.engine.text import IncrementalDetokenizer, StopMatcher

MIXED = "你好，世界！Grüße 🎉😀 naïve café — 東京タワー"


def test_detokenizer_never_emits_half_a_character(tokenizer):
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(MIXED) // 3  # byte-level BPE splits these characters across tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MIXED
    assert any(d == "" for d in deltas), "some tokens must be held back until their character completes"


def test_detokenizer_matches_full_decode_on_long_text(tokenizer):
    text = "def f(x):\n    return x ** 2  # squared\n\n" * 20 + "The end. 完。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids)


def test_detokenizer_flush_drops_a_character_cut_off_by_the_end(tokenizer):
    ids = tokenizer("ok 🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.push(i) for i in ids[:-1])
    assert out + detok.flush() == "ok "


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello ", "wor", "ld", "!"], ["world"], "Hello ", True),
        (["Hello ", "wor", "m"], ["world"], "Hello worm", False),
        (["abc", "END", "more"], ["END", "bc"], "a", True),
        (["no stop here"], [], "no stop here", False),
        (["x<", "|im_e", "nd|>y"], ["<|im_end|>"], "x", True),
        (["ab", "ab", "abc"], ["abc"], "abab", True),
    ],
)
def test_stop_matcher(pieces, stops, emitted, stopped):
    m = StopMatcher(stops)
    out = ""
    for p in pieces:
        out += m.push(p)
        if m.stopped:
            break
        for s in stops:  # nothing emitted so far may contain or end in part of a stop string
            assert s not in out
    if not m.stopped:
        out += m.flush()
    assert out == emitted
    assert m.stopped is stopped


def _run(tokenizer, text: str, **params) -> tuple[str, list]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = SequenceState(tokenizer, GenerationParams(**params), 5, eos_ids={2}, started=0.0)
    chunks = []
    for i in [*ids, 2]:
        chunks.append(seq.add(i))
        if seq.finished:
            break
    return "".join(c.text for c in chunks), chunks


def test_sequence_stop_string_spanning_tokens_never_leaks(tokenizer):
    text, chunks = _run(tokenizer, "The answer is 42. Observation: none", stop=["Observation:"])
    assert text == "The answer is 42. "
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_sequence_eos_and_length(tokenizer):
    text, chunks = _run(tokenizer, "short")
    assert text == "short" and chunks[-1].finish_reason == "stop"
    text, chunks = _run(tokenizer, "one two three four five six", max_new_tokens=3)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3 and len(chunks) == 3
    assert text == tokenizer.decode(tokenizer("one two three four five six")["input_ids"][:3])


def test_sequence_flushes_held_back_text_at_length(tokenizer):
    # "Paris" is held back as a possible start of "Paris!" until max tokens ends the sequence
    text, chunks = _run(tokenizer, "Hello Paris", stop=["Paris!"], max_new_tokens=2)
    assert text == "Hello Paris"
    assert chunks[-1].finish_reason == "length"
