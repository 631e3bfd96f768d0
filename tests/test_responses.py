"""OpenAI Responses (`/v1/responses`), what Codex CLI and the Agents SDK speak, through the
official `openai` SDK (create, stream, parse) and the OpenAI Agents SDK against the shared servers
of the engines that generate here: the event stream and its final response, function calls with
their call_id round-tripping, text.format, previous_response_id from the server's store,
max_output_tokens as incomplete, and errors in OpenAI's shape."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from engines import KEY, MODEL

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
ASK = "What is the weather like in Paris today?"


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def served(request, engine_server):
    return engine_server(request.param)


def client(served, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_create_and_stream_give_the_same_response(served) -> None:
    c = client(served)
    kw = {
        "model": MODEL,
        "input": "Hi!",
        "instructions": "Be brief.",
        "max_output_tokens": 300,
        "temperature": 0,
    }
    whole = c.responses.create(**kw)
    assert whole.object == "response" and whole.status == "completed" and whole.output_text
    assert [o.type for o in whole.output] == ["message"] and whole.output[0].role == "assistant"
    assert whole.usage.input_tokens > 5 and whole.usage.total_tokens == (
        whole.usage.input_tokens + whole.usage.output_tokens
    )
    with c.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == whole.output_text
    assert {(e.output_index, e.content_index, e.item_id) for e in deltas} == {(0, 0, final.output[0].id)}


def test_max_output_tokens_makes_the_response_incomplete(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 3}
    reply = c.responses.create(**kw)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3
    with c.responses.stream(**kw) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"


def test_a_function_call_streams_and_round_trips_with_its_call_id(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "tools": [WEATHER], "temperature": 0, "max_output_tokens": 200}
    forced = {"type": "function", "name": "get_weather"}
    reply = c.responses.create(**kw, input=ASK, tool_choice=forced)
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert {"city", "unit"} <= json.loads(call.arguments).keys()
    with c.responses.stream(**kw, input=ASK, tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments == final.output[-1].arguments == call.arguments
    answered = c.responses.create(
        **kw,
        input=[
            {"role": "user", "content": ASK},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"},
        ],
        tool_choice="none",
    )
    assert answered.status in ("completed", "incomplete") and answered.output[0].type == "message"
    alone = c.responses.create(**{**kw, "max_output_tokens": 1}, input=ASK, tool_choice="none")
    assert answered.usage.input_tokens > alone.usage.input_tokens  # the call and its output were read


def test_a_namespaced_function_comes_back_with_its_namespace(served) -> None:
    # Codex groups its agent tools in namespaces: the call names the function and its namespace
    c = client(served)
    weather = {"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [WEATHER]}
    kw = {"model": MODEL, "tools": [weather], "temperature": 0, "max_output_tokens": 200}
    reply = c.responses.create(**kw, input=ASK, tool_choice="required")
    [call] = reply.output
    assert (call.type, call.name, call.namespace) == ("function_call", "get_weather", "weather")
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}
    follow = c.responses.create(**kw, input=[output], previous_response_id=reply.id, tool_choice="none")
    spelled_out = c.responses.create(
        **kw,
        input=[{"role": "user", "content": ASK}, call.model_dump(exclude_none=True), output],
        tool_choice="none",
    )
    assert follow.output[0].type == "message" and follow.output_text == spelled_out.output_text
    assert follow.usage.input_tokens == spelled_out.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as err:
        hosted = {**weather, "tools": [{"type": "web_search"}]}
        c.responses.create(**kw | {"tools": [hosted]}, input=ASK)
    assert err.value.body["param"] == "tools.0.tools.0.type"


class City(BaseModel):
    name: str
    country: str


def test_parse_follows_text_format(served) -> None:
    c = client(served)
    parsed = c.responses.parse(
        model=MODEL, input="Name a city in France.", text_format=City, temperature=0, max_output_tokens=100
    )
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    loose = c.responses.create(
        model=MODEL,
        input="Describe Paris as JSON.",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=100,
    )
    if loose.status == "completed":
        assert isinstance(json.loads(loose.output_text), dict)


def test_previous_response_id_continues_a_stored_response(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "temperature": 0, "max_output_tokens": 30}
    first = c.responses.create(**kw, input="My name is Ada. Say hello.", instructions="Be brief.")
    assert c.responses.retrieve(first.id).output_text == first.output_text
    follow = c.responses.create(**kw, input="What is my name?", previous_response_id=first.id)
    spelled_out = c.responses.create(
        **kw,
        input=[
            {"role": "user", "content": "My name is Ada. Say hello."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    # instructions are not carried over: the stored conversation is exactly the spelled-out one
    assert follow.output_text == spelled_out.output_text
    assert follow.usage.input_tokens == spelled_out.usage.input_tokens
    assert follow.previous_response_id == first.id
    unstored = c.responses.create(**kw, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.create(**kw, input="Again?", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"


def test_errors_come_in_openais_shape(served) -> None:
    c = client(served)
    kw = {"model": MODEL, "max_output_tokens": 4}
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
    cases = [
        ({"input": [image]}, "text only", "input.0.content.0"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "'web_search'", "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference'", "input.0"),
        (
            {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
            "'nope'",
            None,
        ),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "schema", None),
        ({"input": "x", "tool_choice": "required"}, "has no tools", "tool_choice"),
        ({"input": "x", "tools": [WEATHER, WEATHER]}, "same name", "tools"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "needs call_id, arguments", "input.0"),
    ]
    for extra, words, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(**kw, **extra)
        body = err.value.body
        assert body["type"] == "invalid_request_error" and words in body["message"], body
        assert param is None or body["param"] == param, body
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").responses.create(**kw, input="x")
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no-such-model", input="x")
    # what Codex sends beyond the fields llmhost uses is accepted and ignored
    hi = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
    codex = {
        "model": MODEL, "input": [{"type": "message", "role": "developer", "content": "Be brief."}, hi],
        "reasoning": {"effort": "none", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc", "store": False, "stream": False, "max_output_tokens": 4,
        "service_tier": "auto", "parallel_tool_calls": False,
    }  # fmt: skip
    with served.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = http.post("/v1/responses", json=codex)
    assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete"), r.text


def test_the_agents_sdk_finishes_a_run_that_calls_a_function(served) -> None:
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK is a test dependency")
    agents.set_tracing_disabled(True)  # its tracing would export to OpenAI
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return f"18 degrees and sunny in {city}"

    model = agents.OpenAIResponsesModel(
        model=MODEL, openai_client=openai.AsyncOpenAI(base_url=served.server.url + "/v1", api_key=KEY)
    )
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        model=model,
        tools=[get_weather],
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )
    result = agents.Runner.run_sync(agent, ASK, max_turns=4)
    assert asked and isinstance(result.final_output, str)
    calls = [i for i in result.new_items if i.type == "tool_call_item"]
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert calls and len(outputs) == len(calls)
