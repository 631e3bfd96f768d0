"""What apps and agents send, against a real `llmhost serve` on every engine, through the clients
they use (the official `openai` SDK, LangChain's `langchain-openai`, litellm): tool calls, JSON
outputs, tool round trips, logprobs, reasoning, and a 400 naming the parameter for each mistake.

The local engines (transformers, llama.cpp) constrain decoding themselves; vLLM and the openai
upstream engine pass the fields through to their server."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from engines import ENGINES, KEY, MODEL
from servers import LocalServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# nested objects, arrays, enums, required fields, a strict schema
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["engineer", "artist", "doctor"]},
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "country": {"type": "string", "maxLength": 30},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "skills", "address"],
    "additionalProperties": False,
}
DESCRIBE = [{"role": "user", "content": "Describe a fictional engineer as JSON."}]
# a prompt the 135M embedded model answers with a short object (free JSON may run on to max_tokens)
CITY = "Name a city in France. Reply in JSON."
GREEDY = {"model": MODEL, "temperature": 0}


@pytest.fixture(scope="module", params=ENGINES)
def served(request, engine_server):
    return engine_server(request.param)


def _schema_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def _stream(client, **kw) -> tuple[str, str, list[dict], str | None]:
    """(content, reasoning, calls, finish reason) assembled from a stream as clients do."""
    content, reasoning, calls, finish = [], [], {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                if part.id:
                    assert call["id"] is None, "a call's header came twice"
                    call["id"] = part.id
                    assert part.type == "function" and part.function.name and part.function.arguments == ""
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], finish


# -- structured outputs -------------------------------------------------------------------------


def test_json_schema_output_validates(served) -> None:
    client = served.client()
    reply = client.chat.completions.create(
        **GREEDY, messages=DESCRIBE, response_format=_schema_format(), max_tokens=300
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    content, _, _, finish = _stream(
        client, **GREEDY, messages=DESCRIBE, response_format=_schema_format(), max_tokens=300
    )
    assert (content, finish) == (choice.message.content, "stop")


def test_json_object_output_parses(served) -> None:
    reply = served.client().chat.completions.create(
        **GREEDY,
        messages=[{"role": "user", "content": CITY}],
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# -- tool calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_validates_and_streams_the_same(served, choice) -> None:
    client = served.client()
    kw = {**GREEDY, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 100}
    reply = client.chat.completions.create(**kw)
    message = reply.choices[0].message
    # vLLM answers a named choice with "stop", as OpenAI itself does; llmhost says "tool_calls"
    finish = "stop" if served.kind == "vllm" and isinstance(choice, dict) else "tool_calls"
    assert reply.choices[0].finish_reason == finish and not message.content
    [call] = message.tool_calls
    assert call.type == "function" and call.id
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    content, _, calls, streamed_finish = _stream(client, **kw)
    assert (content or "", streamed_finish) == ("", finish)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (call.function.name, json.loads(call.function.arguments))
    ]


def test_tool_round_trip(served) -> None:
    """call → the tool's result as a `tool` message → an answer: the conversation renders
    through the template (the result is in the prompt) and the reply is text."""
    client = served.client()
    kw = {**GREEDY, "tools": [WEATHER], "max_tokens": 40}
    first = client.chat.completions.create(**kw, messages=ASK, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    result = "It is sunny and 21 degrees Celsius in Paris."
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = client.chat.completions.create(**kw, messages=history, tool_choice="none")
    shorter = client.chat.completions.create(
        **kw, messages=[*history[:-1], {**history[-1], "content": "ok"}], tool_choice="none"
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls
    # the result's text reached the prompt
    assert answer.usage.prompt_tokens - shorter.usage.prompt_tokens >= 8


def test_tool_choice_none_and_auto_answer_in_text(served) -> None:
    client = served.client()
    reply = client.chat.completions.create(
        **GREEDY,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=20,
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs(served) -> None:
    reply = served.client().chat.completions.create(
        **GREEDY, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) >= 1
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the token taken is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-3


# -- mistakes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
            "messages.0.content",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages.1"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ],
)
def test_mistakes_get_a_400_naming_the_parameter(served, extra, param) -> None:
    if served.kind == "vllm" and param == "response_format":
        pytest.skip("vLLM refuses an invalid schema itself, with its own param naming")
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(**{**GREEDY, "messages": ASK, "max_tokens": 5, **extra})
    error = info.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error", error


# -- the clients agents use ---------------------------------------------------------------------


def test_langchain(served) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    class City(BaseModel):
        """A city and its country."""

        name: str = Field(max_length=30)
        country: str = Field(max_length=30)

    llm = ChatOpenAI(
        model=MODEL, base_url=served.server.url + "/v1", api_key=KEY, temperature=0, max_tokens=80
    )
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather" and isinstance(
        message.tool_calls[0]["args"]["city"], str
    )
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Name a city in France.")
        assert isinstance(city, City) and city.name, method
    loose = {"title": "answer", "type": "object", "properties": {"city": {"type": "string"}}}
    found = llm.with_structured_output(loose, method="json_mode").invoke(CITY)
    assert isinstance(found, dict)


def test_litellm(served, monkeypatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
    import litellm

    kw = {
        "model": f"openai/{MODEL}",
        "api_base": served.server.url + "/v1",
        "api_key": KEY,
        "temperature": 0,
        "max_tokens": 100,
    }
    reply = litellm.completion(**kw, messages=ASK, tools=[WEATHER], tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather",)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    reply = litellm.completion(
        **kw, messages=[{"role": "user", "content": CITY}], response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# -- reasoning ----------------------------------------------------------------------------------

# a Qwen3-style template on the embedded model: with thinking on the reply starts inside
# <think> (as DeepSeek-R1 distills' prompts do), with enable_thinking false it is closed empty
THINKING_TEMPLATE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{%- endif %}"""


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def thinker(request, tmp_path_factory, engine_server):
    engine_server(request.param)  # skips (or fails under CI) when the engine is missing
    template = tmp_path_factory.mktemp("tpl") / "think.jinja"
    template.write_text(THINKING_TEMPLATE)
    server = LocalServer("--engine", request.param, "--dtype", "float32", "--chat-template", str(template))
    server.flags = ("--engine", request.param, "--dtype", "float32", "--chat-template", str(template))
    yield server
    server.stop()


def _ask(client, **kw):
    return client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=12,
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        **kw,
    )


def test_reasoning_is_returned_apart(thinker: LocalServer) -> None:
    client = thinker.client()
    thinking = _ask(client).choices[0].message
    assert thinking.model_extra["reasoning_content"] and not thinking.content
    content, reasoning, _, _ = _stream(
        client,
        model=MODEL,
        temperature=0,
        max_tokens=12,
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
    )
    assert (content, reasoning) == ("", thinking.model_extra["reasoning_content"])
    for off in (
        {"reasoning_effort": "none"},
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
    ):
        answer = _ask(client, **off).choices[0].message
        assert answer.content and "reasoning_content" not in answer.model_extra, off


def test_agent_protocols_return_reasoning_apart(thinker: LocalServer) -> None:
    """Messages: a thinking block (thinking_delta when streamed); Responses: a reasoning item,
    its text as reasoning_text, or as summary_text when a summary is asked for."""
    import anthropic

    thought = _ask(thinker.client()).choices[0].message.model_extra["reasoning_content"]
    claude = anthropic.Anthropic(base_url=thinker.url, api_key="none", max_retries=0)
    kw = {"model": MODEL, "max_tokens": 12, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    greedy = {"extra_body": {"temperature": 0}}
    reply = claude.messages.create(**kw, **greedy)
    assert [b.type for b in reply.content] == ["thinking"] and reply.content[0].thinking == thought
    with claude.messages.stream(**kw, **greedy) as stream:
        deltas = [e.delta.thinking for e in stream if e.type == "content_block_delta"]
    assert "".join(deltas) == thought
    off = claude.messages.create(**kw, thinking={"type": "disabled"}, **greedy)
    assert off.content[0].type == "text" and off.content[0].text
    openai = thinker.client()
    ask = {"model": MODEL, "input": "Why is the sky blue?", "max_output_tokens": 12, "temperature": 0}
    [item] = openai.responses.create(**ask).output
    assert item.type == "reasoning" and item.content[0].text == thought and item.summary == []
    summary = openai.responses.create(**ask, reasoning={"summary": "auto"}).output[0]
    assert summary.summary[0].text == thought
    events = list(openai.responses.create(**ask, reasoning={"summary": "auto"}, stream=True))
    streamed = [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"]
    assert "".join(streamed) == thought and events[-1].type == "response.incomplete"
    answer = openai.responses.create(**ask, reasoning={"effort": "none"})
    assert answer.output[0].type == "message" and answer.output_text


def test_serve_reasoning_off_sets_the_default(thinker: LocalServer, tmp_path: Path) -> None:
    server = LocalServer(*thinker.flags, "--reasoning", "off")
    try:
        client = server.client()
        assert _ask(client).choices[0].message.content
        assert _ask(client, reasoning_effort="high").choices[0].message.model_extra["reasoning_content"]
    finally:
        server.stop()


def test_completions_take_logprobs_and_a_schema(served) -> None:
    reply = served.client().completions.create(
        model=MODEL,
        prompt="The capital of France is",
        temperature=0,
        max_tokens=5,
        logprobs=2,
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) >= 1
    assert all(len(top) == 2 for top in logprobs.top_logprobs) and all(
        lp <= 0 for lp in logprobs.token_logprobs
    )
    assert "".join(logprobs.tokens) == reply.choices[0].text
    city = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    reply = served.client().completions.create(
        model=MODEL,
        prompt="A city in France, as JSON: ",
        temperature=0,
        max_tokens=40,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": city}}},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), city)


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def native(request, engine_server):
    """The embedded model under Qwen2.5's own template, which renders tools itself."""
    engine_server(request.param)
    template = Path(__file__).parent / "data" / "qwen2.5-tools.jinja"
    server = LocalServer("--engine", request.param, "--dtype", "float32", "--chat-template", str(template))
    yield server
    server.stop()


def test_a_template_with_tools_renders_them_and_the_round_trip(native: LocalServer) -> None:
    client = native.client()
    kw = {**GREEDY, "tools": [WEATHER], "max_tokens": 60}
    first = client.chat.completions.create(**kw, messages=ASK, tool_choice="required")
    [call] = first.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "It is sunny and 21 degrees Celsius in Paris."},
    ]
    answer = client.chat.completions.create(**kw, messages=history)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    # Qwen's template writes the tools into its system turn: the prompt is longer with them
    bare = client.chat.completions.create(**{**GREEDY, "max_tokens": 1}, messages=ASK)
    assert first.usage.prompt_tokens > bare.usage.prompt_tokens + 50
