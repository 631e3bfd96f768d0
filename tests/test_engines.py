"""One behavioural suite, run against every engine through `llmhost serve --engine X` and the
official client: whatever runs the model, a caller sees the same API and the same rules."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from engines import ENGINES, KEY, MODEL, require
from servers import ServerProcess, wait_for

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module", params=ENGINES)
def served(request, engine_server):
    return engine_server(request.param)


def _streamed(client, **kw) -> tuple[str, list, object]:
    parts, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    return "".join(parts), reasons, usage


def test_health_names_the_engine(served) -> None:
    with served.server.http() as http:
        health = http.get("/health").json()
    assert health["status"] == "ok" and health["engines"] == {MODEL: served.kind}
    assert [m.id for m in served.client().models.list().data] == [MODEL]


def test_greedy_is_deterministic_and_stream_equals_non_stream(served) -> None:
    client = served.client()
    a = client.chat.completions.create(messages=STORY, **GREEDY)
    b = client.chat.completions.create(messages=STORY, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    text, reasons, usage = _streamed(client, messages=STORY, **GREEDY)
    assert text == a.choices[0].message.content and len(text) > 40
    assert reasons[-1] == a.choices[0].finish_reason == "length" and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == a.usage.completion_tokens == 40
    assert usage.prompt_tokens == a.usage.prompt_tokens > 10
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_max_tokens_and_natural_stop(served) -> None:
    client = served.client()
    sum_ = [{"role": "user", "content": "What is 2+2?"}]
    short = client.chat.completions.create(messages=sum_, **{**GREEDY, "max_tokens": 3})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    whole = client.chat.completions.create(messages=sum_, **{**GREEDY, "max_tokens": 200})
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens < 200
    assert whole.choices[0].message.content.startswith(short.choices[0].message.content)


def test_stop_strings_cut_the_reply_and_never_leak(served) -> None:
    client = served.client()
    full = client.chat.completions.create(messages=STORY, **GREEDY).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(messages=STORY, stop=[stop], **GREEDY)
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    text, reasons, _ = _streamed(client, messages=STORY, stop=[stop], **GREEDY)
    assert text == full[: full.find(stop)] and reasons[-1] == "stop"


def test_seeded_sampling_repeats(served) -> None:
    client = served.client()
    kw = {"model": MODEL, "messages": STORY, "temperature": 1.0, "max_tokens": 24, "seed": 1234}
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first
    others = {
        client.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content for s in (1, 2, 3)
    }
    assert len(others | {first}) > 1


def test_completions_endpoint(served) -> None:
    client = served.client()
    kw = {"model": MODEL, "prompt": "The three primary colours are", "temperature": 0, "max_tokens": 12}
    a = client.completions.create(**kw)
    assert a.choices[0].text == client.completions.create(**kw).choices[0].text
    assert a.usage.completion_tokens == 12 and a.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == a.choices[0].text


def test_hanging_up_stops_the_generation(served) -> None:
    body = {**GREEDY, "messages": STORY, "max_tokens": 1500, "stream": True}
    with served.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert served.engine_busy() == 1
            started = time.monotonic()
        # 1500 tokens take a minute or more here; the engine must be idle long before that
        assert wait_for(lambda: served.engine_busy() == 0, 15), "still generating after the client left"
        assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"model": "no-such-model"}, 404, "no-such-model"),
        ({"temperature": 7}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
    ],
)
def test_bad_requests_get_openai_errors(served, change, status, fragment) -> None:
    body = {**GREEDY, "messages": QUESTION, **change}
    with served.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"].lower()


def test_api_key_is_the_fronts(served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").models.list()
    with served.server.http() as http:
        assert http.post("/v1/chat/completions", json={**GREEDY, "messages": QUESTION}).status_code == 401
        assert http.get("/health").status_code == 200  # health needs no key


def test_metrics_count_the_engines_tokens(served) -> None:
    from servers import metric

    with served.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        before = metric(http.get("/metrics").text, "llmhost_completion_tokens_total")
        served.client().chat.completions.create(messages=QUESTION, **{**GREEDY, "max_tokens": 5})
        after = metric(http.get("/metrics").text, "llmhost_completion_tokens_total")
    assert after - before == 5


def test_concurrent_clients_get_their_solo_replies(served) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[{"role": "user", "content": f"Name {n} animals that live in the sea."}] for n in (2, 3, 4)]
    client = served.client()

    def ask(messages):
        return (
            client.chat.completions.create(messages=messages, **{**GREEDY, "max_tokens": 24})
            .choices[0]
            .message.content
        )

    solo = [ask(m) for m in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo


def test_unreachable_route_is_openai_404(served) -> None:
    with httpx.Client(base_url=served.server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("installed", [True, False])
def test_auto_runs_gguf_on_llamacpp_when_installed(monkeypatch, caplog, embedded_dir, installed) -> None:
    from llmhost.config import LoadSettings
    from llmhost.engine.backends import llamacpp
    from llmhost.engine.loader import choose_engine
    from llmhost.engine.ref import ModelRef, resolve_ref
    from llmhost.store.embedded import embedded_gguf

    monkeypatch.delenv("LLMHOST_ENGINE")
    monkeypatch.setattr(llamacpp, "available", lambda: installed)
    auto = LoadSettings()
    gguf = "llamacpp" if installed else "transformers"
    embedded = resolve_ref(None)
    adapter = ModelRef("store", "lora", "tuned", embedded_dir, base=embedded)
    assert auto.engine == "auto"
    assert choose_engine(embedded, auto) == choose_engine(resolve_ref(str(embedded_gguf()[0])), auto) == gguf
    assert ("llmhost[llamacpp]" in caplog.text) != installed  # the hint, only when it helps
    assert choose_engine(resolve_ref(str(embedded_dir)), auto) == "transformers"  # an HF folder
    assert choose_engine(adapter, auto) == "transformers"  # LoRA adapters merge in torch
    assert choose_engine(embedded, LoadSettings(device="cuda")) == "transformers"
    assert choose_engine(embedded, LoadSettings(upstream="http://127.0.0.1:9/v1")) == "openai"
    assert choose_engine(embedded, LoadSettings(engine="vllm")) == "vllm"  # only when asked for


def test_serve_with_no_engine_flag_runs_the_embedded_gguf_on_llamacpp(embedded_dir) -> None:
    require("llamacpp")
    server = ServerProcess("--api-key", KEY, drop_env=("LLMHOST_ENGINE",))
    try:
        with server.http() as http:
            assert http.get("/health").json()["engines"] == {MODEL: "llamacpp"}
        reply = server.client(KEY).chat.completions.create(messages=QUESTION, **GREEDY)
        assert reply.choices[0].message.content
    finally:
        server.stop()
