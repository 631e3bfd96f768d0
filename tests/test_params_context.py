"""Parameter validation messages and the context policy, without a model."""

from __future__ import annotations

import pytest

from llmhost.engine import make_params
from llmhost.engine.context import fit_messages, validate_messages
from llmhost.errors import ContextOverflowError, InvalidRequestError


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"temperature": -0.1}, "temperature: Input should be greater than or equal to 0 (got -0.1)"),
        ({"temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
        ({"top_p": 0}, "top_p: Input should be greater than 0 (got 0)"),
        ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
        ({"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
        ({"seed": -5}, "seed: Input should be greater than or equal to 0"),
        ({"stop": [""]}, "stop: stop strings must not be empty"),
        ({"stop": ["x"] * 17}, "stop: List should have at most 16 items"),
        ({"temprature": 1}, "temprature: unknown parameter"),
        ({"max_new_tokens": "many"}, "max_new_tokens: Input should be a valid integer"),
    ],
)
def test_invalid_params_say_which_and_why(values, fragment):
    with pytest.raises(InvalidRequestError) as info:
        make_params(**values)
    assert str(info.value).startswith("invalid generation parameters: ")
    assert fragment in str(info.value)
    assert info.value.param == next(iter(values))


def test_valid_params_defaults():
    p = make_params(temperature=0)
    assert p.greedy and p.max_new_tokens == 512 and p.stop == []


def _count(messages):  # one token per word plus two per message
    return sum(len(m["content"].split()) + 2 for m in messages)


def _encode(messages):
    return [0] * _count(messages)


def _conv(n_turns: int, words: int = 10):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(n_turns):
        msgs.append({"role": "user", "content": " ".join([f"q{i}"] * words)})
        msgs.append({"role": "assistant", "content": " ".join([f"a{i}"] * words)})
    msgs.append({"role": "user", "content": "last question"})
    return msgs


def test_fit_keeps_everything_that_fits():
    msgs = _conv(2)
    kept, dropped, ids = fit_messages(msgs, _encode, max_new_tokens=10, context_length=1000)
    assert kept == msgs and dropped == 0 and len(ids) == _count(msgs)


def test_fit_drops_oldest_turns_keeps_system_and_latest():
    msgs = _conv(5)  # 4 + 5 * 24 + 4 = 128 tokens
    kept, dropped, ids = fit_messages(msgs, _encode, max_new_tokens=20, context_length=80)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1]["role"] == "user", "history must not start with an orphaned assistant reply"
    assert dropped == len(msgs) - len(kept) and dropped % 2 == 0 and dropped > 0
    assert len(ids) + 20 <= 80
    assert kept[1:] == msgs[1 + dropped :]


def test_fit_raises_when_latest_turn_alone_is_too_long():
    msgs = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(ContextOverflowError) as info:
        fit_messages(msgs, _encode, max_new_tokens=50, context_length=100)
    err = info.value
    assert (err.prompt_tokens, err.max_new_tokens, err.context_length) == (202, 50, 100)
    assert "202 tokens" in str(err) and "context window is 100 tokens" in str(err)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role is 'robot'"),
        ([{"role": "user"}], "messages[0] must have a string 'content'"),
        ([{"role": "user", "content": 3}], "string 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ],
)
def test_invalid_messages(messages, fragment):
    with pytest.raises(InvalidRequestError, match=None) as info:
        validate_messages(messages)
    assert fragment in str(info.value)
