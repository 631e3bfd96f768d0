"""Anthropic Messages (`/v1/messages`), what Claude Code speaks, through the official `anthropic`
SDK against the shared servers of the engines that generate here (transformers, llama.cpp):
create, the event stream and its final message, a forced tool_use round trip with streamed
input_json_delta, and errors in Anthropic's shape."""

from __future__ import annotations

import json

import pytest

from engines import KEY, MODEL

anthropic = pytest.importorskip(
    "anthropic", reason="the anthropic SDK is a test dependency: pip install anthropic"
)

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# the 2026 SDK has no temperature argument (newer Claude models decide it): greedy goes in the body
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def served(request, engine_server):
    return engine_server(request.param)


def client(served, key: str = KEY):
    return anthropic.Anthropic(base_url=served.server.url, api_key=key, max_retries=0, timeout=120)


def test_create_and_stream_give_the_same_message(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "max_tokens": 24, "messages": [{"role": "user", "content": "Hi!"}], **GREEDY}
    cached = {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}
    whole = c.messages.create(**kw, system=[cached])
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.usage.input_tokens > 5
    with c.messages.stream(**kw, system="Be brief.") as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert (
        events.index("content_block_start")
        < events.index("content_block_stop")
        < events.index("message_delta")
    )


def test_max_tokens_is_reported_as_anthropic_does(served) -> None:
    story = [{"role": "user", "content": "Tell me a long story."}]
    reply = client(served).messages.create(model=MODEL, max_tokens=3, messages=story, **GREEDY)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3


def test_a_forced_tool_use_streams_its_input_and_round_trips(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "max_tokens": 200, "tools": [WEATHER], **GREEDY}
    reply = c.messages.create(**kw, messages=ASK, tool_choice={"type": "tool", "name": "get_weather"})
    [call] = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and call.name == "get_weather"
    assert isinstance(call.input, dict) and {"city", "unit"} <= call.input.keys()
    with c.messages.stream(**kw, messages=ASK, tool_choice={"type": "any"}) as stream:
        deltas = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert json.loads("".join(deltas)) == streamed.input and streamed.input == call.input
    answered = c.messages.create(
        **kw,
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "18 degrees and sunny"}
                ],
            },
        ],
        tool_choice={"type": "none"},
    )
    assert answered.stop_reason in ("end_turn", "max_tokens") and answered.content[0].type == "text"


def test_errors_come_in_anthropics_shape(served) -> None:
    c = client(served)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client(served, key="wrong").messages.create(model=MODEL, max_tokens=8, messages=ASK)
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
        c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert "text only" in err.value.body["error"]["message"]
    search = {"type": "web_search_20250305", "name": "web_search"}
    with pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model=MODEL, max_tokens=8, messages=ASK, tools=[search])
    assert "'web_search_20250305'" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "nope"},
        )
    assert (
        "'nope'" in err.value.body["error"]["message"] and "get_weather" in err.value.body["error"]["message"]
    )
    with pytest.raises(anthropic.NotFoundError) as err:
        c.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert err.value.body["error"]["type"] == "not_found_error"
    with served.server.http(headers={"x-api-key": KEY}) as http:
        r = http.post("/v1/messages", json={"model": MODEL, "messages": ASK})  # max_tokens is required
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in r.json()["error"]["message"]
        # tool turns without the ids that tie a call to its result
        for block, words in (
            ({"role": "assistant", "content": [{"type": "tool_use", "input": {}}]}, "without id and name"),
            ({"role": "user", "content": [{"type": "tool_result", "content": "x"}]}, "without tool_use_id"),
        ):
            body = {"model": MODEL, "max_tokens": 2, "messages": [*ASK, block]}
            r = http.post("/v1/messages", json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        # Claude Code's query and headers are accepted
        body = {"model": MODEL, "max_tokens": 2, "messages": ASK, "metadata": {"user_id": "u"}}
        headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"}
        r = http.post("/v1/messages?beta=true", json=body, headers=headers)
        assert r.status_code == 200, r.text


def test_count_tokens_stop_sequences_and_claude_model_names(served) -> None:
    c = client(served)
    ask = [{"role": "user", "content": "List five fruits, one per line."}]
    kw = {"max_tokens": 40, "messages": ask, "system": "Be brief.", **GREEDY}
    whole = c.messages.create(model=MODEL, **kw)
    counted = c.messages.count_tokens(model=MODEL, messages=ask, system="Be brief.")
    assert counted.input_tokens == whole.usage.input_tokens
    with_tools = c.messages.count_tokens(model=MODEL, messages=ask, system="Be brief.", tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens  # the tools are part of the prompt
    # an agent configured for Claude runs on the served model (--model-alias claude-*)
    aliased = c.messages.create(model="claude-sonnet-4-5", **kw)
    assert aliased.content[0].text == whole.content[0].text
    # a stop string from inside the reply ends it there, and the reply says which one
    text = whole.content[0].text
    words = [w for w in text.split() if len(w) > 2 and text.index(w) > 0]
    assert words, f"the reply is too short to pick a stop string from: {text!r}"
    stop = words[len(words) // 2]
    cut = c.messages.create(model=MODEL, **kw, stop_sequences=["@@never@@", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    with c.messages.stream(model=MODEL, **kw, stop_sequences=[stop]) as stream:
        deltas = [e.delta for e in stream if e.type == "message_delta"]
    assert [(d.stop_reason, d.stop_sequence) for d in deltas] == [("stop_sequence", stop)]
    assert whole.stop_sequence is None
