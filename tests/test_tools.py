"""The reply side of tool calling and reasoning, without a model: recorded outputs of each format,
streamed with the text split at every character boundary, must give the same calls, the same
answer and the same reasoning as the whole text, and never let tag text into the answer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from llmhost.engine.grammar import grammar_for
from llmhost.engine.params import GenerationParams
from llmhost.engine.reply import ReplyParser
from llmhost.engine.tools import call_schema, parse_block, template_messages, uses_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# what models of each family really write (Qwen2.5 / Qwen3 Hermes style, Qwen3-Coder XML,
# SmolLM2's list inside one tag, and a Qwen3 reply that thinks first)
HERMES = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_TWO = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)
XML = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
SMOL_LIST = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
THINKING = (
    "<think>\nThe user wants weather; I should call the tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
UNCLOSED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
NOT_A_CALL = "<tool_call>I am not JSON</tool_call> done"


def run(text: str, cut: list[int], **kw) -> tuple[str, str, list]:
    """Feed `text` to a ReplyParser in pieces cut at `cut`; (answer, reasoning, calls)."""
    parser = ReplyParser(**kw)
    answer, reasoning, calls = [], [], []
    bounds = [0, *cut, len(text)]
    for a, b in itertools.pairwise(bounds):
        got = parser.push(text[a:b])
        answer.append(got.answer)
        reasoning.append(got.reasoning)
        calls += got.calls
    got = parser.flush()
    answer.append(got.answer)
    reasoning.append(got.reasoning)
    calls += got.calls
    return "".join(answer), "".join(reasoning), [(c.name, json.loads(c.arguments)) for c in calls]


def every_split(text: str):
    """The whole text, one character at a time, and cut once at every boundary."""
    yield []
    yield list(range(1, len(text)))
    for i in range(1, len(text)):
        yield [i]


@pytest.mark.parametrize(
    ("text", "answer", "calls"),
    [
        (HERMES, "Let me check.", [("get_weather", {"city": "Paris"})]),
        (HERMES_TWO, "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
        (XML, "", [("get_weather", {"city": "São Paulo", "days": 3})]),
        (SMOL_LIST, "", [("get_weather", {"city": "Oslo"})]),
        (UNCLOSED, "", [("get_weather", {"city": "Paris"})]),
        (NOT_A_CALL, "<tool_call>I am not JSON</tool_call> done", []),
        (
            "No call here, just <b>text</b> < and tool_call.",
            "No call here, just <b>text</b> < and tool_call.",
            [],
        ),
    ],
)
def test_calls_parse_the_same_however_the_text_is_split(text, answer, calls) -> None:
    for cut in every_split(text):
        got_answer, reasoning, got_calls = run(text, cut, tools=True)
        assert (got_answer, got_calls, reasoning) == (answer, calls, ""), cut


def test_no_tag_text_reaches_the_answer_while_streaming() -> None:
    for text in (HERMES, HERMES_TWO, XML, SMOL_LIST, THINKING):
        parser = ReplyParser(thinks=True, tools=True)
        shown = ""
        for ch in text:
            shown += parser.push(ch).answer
            assert "<" not in shown.replace("Let me check.", ""), (text, shown)
        assert "tool_call" not in shown + parser.flush().answer


@pytest.mark.parametrize("opened", [False, True])
def test_reasoning_is_split_from_the_answer(opened: bool) -> None:
    text = "<think>\nFirst, 2 + 2.\nIt is 4.\n</think>\n\nThe answer is 4."
    if opened:  # the template opened the block (DeepSeek-R1 distills): the model starts inside it
        text = text.removeprefix("<think>")
    for cut in every_split(text):
        answer, reasoning, calls = run(text, cut, thinks=True, opened=opened)
        assert (answer, reasoning.strip(), calls) == ("The answer is 4.", "First, 2 + 2.\nIt is 4.", []), cut


def test_thinking_then_a_call() -> None:
    for cut in every_split(THINKING):
        answer, reasoning, calls = run(THINKING, cut, thinks=True, tools=True)
        assert answer == "" and calls == [("get_weather", {"city": "Paris"})], cut
        assert reasoning.strip() == "The user wants weather; I should call the tool."


def test_a_reply_without_thinking_is_all_answer() -> None:
    for text in ("Hello there", "  Hi <think> is a tag", "<thin>k"):
        for cut in every_split(text):
            assert run(text, cut, thinks=True)[:2] == (text, ""), (text, cut)


def test_unfinished_reasoning_stays_reasoning() -> None:
    answer, reasoning, _ = run("<think>still thinking when max_tokens came", [3, 9])
    assert answer == "<think>still thinking when max_tokens came" and reasoning == ""  # no thinking model
    answer, reasoning, _ = run("<think>still thinking when max_tokens came", [3, 9], thinks=True)
    assert (answer, reasoning) == ("", "still thinking when max_tokens came")


def test_parallel_false_keeps_the_first_call() -> None:
    assert [c[1]["city"] for c in run(HERMES_TWO, [], tools=True, one_call=True)[2]] == ["Paris"]


def test_blocks_that_are_not_calls() -> None:
    assert parse_block('{"arguments": {}}') is None  # no name
    assert parse_block('{"name": "f", "arguments": [1]}') is None  # arguments not an object
    [call] = parse_block('{"name": "f", "arguments": "{\\"a\\": 1}"}')  # arguments as JSON text
    assert json.loads(call.arguments) == {"a": 1} and call.id.startswith("call_")


def test_template_messages_native_and_fallback() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]
    native = template_messages(messages, [WEATHER], native=True)
    # transformers' templates read the arguments as an object
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[1]["content"] == "" and native[2]["role"] == "tool"
    fallback = template_messages(messages, [WEATHER], native=False)
    assert fallback[0]["role"] == "system" and '"name": "get_weather"' in fallback[0]["content"]
    assert "<tool_call>" in fallback[2]["content"] and "tool_calls" not in fallback[2]
    assert fallback[3] == {"role": "user", "content": "<tool_response>\nSunny\n</tool_response>"}
    assert messages[1]["content"] is None  # the caller's messages are left as they were


def test_which_templates_render_tools() -> None:
    assert uses_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not uses_tools("{% for m in messages %}{{ m.content }}{% endfor %}") and not uses_tools(None)


def test_grammar_for_forced_calls_and_schemas() -> None:
    free = GenerationParams(tools=[WEATHER])
    assert (
        grammar_for(free) is None
        and grammar_for(GenerationParams(tools=[WEATHER], tool_choice="none")) is None
    )
    lark, param = grammar_for(GenerationParams(tools=[WEATHER], tool_choice="required"))
    assert param == "tools" and lark.startswith("start: call\n") and '"const": "get_weather"' in lark
    lark, _ = grammar_for(GenerationParams(tools=[WEATHER], tool_choice="required", parallel_tool_calls=True))
    assert lark.startswith('start: call ("\\n" call)*')
    lark, param = grammar_for(GenerationParams(json_schema={"type": "object"}))
    assert param == "response_format" and "%json" in lark
    assert call_schema([WEATHER, WEATHER | {"function": {"name": "other"}}], None)["anyOf"][1]["properties"][
        "name"
    ] == {"const": "other"}


QWEN25 = Path(__file__).parent / "data" / "qwen2.5-tools.jinja"  # Qwen2.5-Instruct's template


def test_a_native_template_renders_tools_calls_and_results() -> None:
    """Qwen2.5's own template gets the tools and a call's arguments as an object (`| tojson`
    of a JSON string would print it quoted twice), and renders the result as its tool response."""
    from llmhost.engine.template import ChatTemplate

    template = ChatTemplate(QWEN25.read_text(), "qwen", {}, ["<|im_start|>", "<|im_end|>"])
    assert template.native_tools
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    ]
    text = template.render(template_messages(messages, [WEATHER], native=True), tools=[WEATHER])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
