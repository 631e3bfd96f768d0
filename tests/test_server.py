"""The OpenAI-compatible server, for real: a subprocess on 127.0.0.1 and the official client."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from servers import LocalServer, ServerProcess, metric, wait_for

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    server = LocalServer(str(tiny_dir), "--dtype", "float32", "--api-key", "sekret")
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def model_name(tiny_dir):
    return tiny_dir.name


def test_models_and_health(tiny_server, model_name):
    client = tiny_server.client("sekret")
    assert [m.id for m in client.models.list().data] == [model_name]
    with tiny_server.http() as http:
        r = http.get("/health")  # no key needed
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_stream_equals_non_stream_and_usage_adds_up(tiny_server, model_name):
    client = tiny_server.client("sekret")
    whole = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finishes, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(parts) == whole.choices[0].message.content
    assert finishes == ["length"] == [whole.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == 20 == whole.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_endpoint(tiny_server, model_name):
    client = tiny_server.client("sekret")
    r = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=6, temperature=0)
    s = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_stop_and_seed(tiny_server, model_name):
    client = tiny_server.client("sekret")
    full = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[10:13]
    cut = client.chat.completions.create(
        model=model_name, messages=HELLO, temperature=0, max_tokens=30, stop=stop
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    a, b = (
        client.chat.completions.create(model=model_name, messages=HELLO, temperature=1, seed=5, max_tokens=12)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("body", ["{{{", "[]", "42", "null", "", '"text"'])
def test_malformed_bodies_are_400_in_openai_shape(tiny_server, body):
    with tiny_server.http(headers={"Authorization": "Bearer sekret"}) as http:
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "status", "fragment"),
    [
        ({"temperature": 5}, 400, "temperature: Input should be less than or equal to 2"),
        ({"n": 2}, 400, "n: Input should be less than or equal to 1"),
        ({"logit_bias": {"1": 5}}, 400, "logit_bias: unknown parameter"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            400,
            "the last message must come from the user",
        ),
        ({"model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
        ({"max_tokens": 1000}, 400, "context window is 1024 tokens"),
        ({"stop": [""]}, 400, "stop strings must not be empty"),
    ],
)
def test_bad_requests(tiny_server, model_name, extra, status, fragment):
    body = {"model": model_name, "messages": HELLO, **extra}
    if extra.get("max_tokens") == 1000:
        body["messages"] = [{"role": "user", "content": "word " * 300}]
    with tiny_server.http(headers={"Authorization": "Bearer sekret"}) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"]
        assert http.get("/health").status_code == 200  # still healthy


def test_context_error_has_code_and_numbers(tiny_server, model_name):
    client = tiny_server.client("sekret")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "word " * 300}], max_tokens=1000
        )
    assert info.value.code == "context_length_exceeded"
    assert "max_new_tokens is 1000" in info.value.message


def test_truncate_history_extension_drops_oldest_turns_and_says_so(tiny_server, model_name):
    client = tiny_server.client("sekret")
    long_chat = []
    for i in range(6):  # ~6 × 150 tokens: more than fits beside 200 new tokens in 1024
        long_chat += [
            {"role": "user", "content": f"question {i} " + "word " * 70},
            {"role": "assistant", "content": "answer " * 70},
        ]
    long_chat.append({"role": "user", "content": "and now?"})
    kw = {"model": model_name, "messages": long_chat, "max_tokens": 200, "temperature": 0}
    with pytest.raises(openai.BadRequestError):  # the default stays OpenAI's: the caller decides
        client.chat.completions.create(**kw)
    whole = client.chat.completions.create(**kw, extra_body={"truncate_history": True})
    dropped = whole.model_extra["llmhost"]["dropped_turns"]
    assert dropped >= 2 and dropped % 2 == 0  # whole turns: a kept history never starts mid-turn
    assert whole.usage.prompt_tokens + 200 <= 1024
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}, extra_body={"truncate_history": True}
    )
    reported = [c.model_extra["llmhost"]["dropped_turns"] for c in stream if "llmhost" in c.model_extra]
    assert reported == [dropped, dropped]  # on the final chunk and on the usage chunk
    plain = client.chat.completions.create(**{**kw, "messages": HELLO})
    assert "llmhost" not in plain.model_extra  # standard responses stay standard


def test_api_key_required(tiny_server, model_name):
    with pytest.raises(openai.AuthenticationError):
        tiny_server.client("wrong").models.list()
    with tiny_server.http() as http:
        for path in ("/v1/models", "/metrics"):
            r = http.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = http.post("/v1/chat/completions", json={"model": model_name, "messages": HELLO})
        assert r.status_code == 401


def test_eight_concurrent_streams_equal_solo(tiny_server, model_name):
    client = tiny_server.client("sekret")
    prompts = [f"Question {i}: tell me about number {i * 7}" for i in range(8)]

    def ask(p: str, out: list, i: int) -> None:
        stream = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": p}],
            temperature=0,
            max_tokens=40,
            stream=True,
        )
        out[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    solo = [None] * 8
    for i, p in enumerate(prompts):
        ask(p, solo, i)
    together = [None] * 8
    threads = [threading.Thread(target=ask, args=(p, together, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == solo


def test_metrics_exposes_counters_and_histograms(tiny_server):
    with tiny_server.http(headers={"Authorization": "Bearer sekret"}) as http:
        text = http.get("/metrics").text
    for name in (
        "llmhost_requests_total",
        "llmhost_prompt_tokens_total",
        "llmhost_completion_tokens_total",
        "llmhost_time_to_first_token_seconds_bucket",
        "llmhost_time_per_output_token_seconds_bucket",
        "llmhost_queue_length",
        "llmhost_running_requests",
    ):
        assert name in text
    assert metric(text, "llmhost_completion_tokens_total") > 0


def test_mid_stream_failure_is_an_sse_error_event_then_done(tiny_dir):
    """In-process app with an engine whose stream breaks after one chunk (a fault we cannot cause
    on a healthy model): the client must get an `error` event and then `[DONE]`."""
    import asyncio

    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.server.app import create_app
    from llmhost.server.pool import ModelPool
    from llmhost.server.settings import ServerSettings

    engine = load(str(tiny_dir), LoadSettings(dtype="float32"))
    real = engine.astream

    async def breaking(*a, **kw):
        inner = await real(*a, **kw)

        async def gen():
            async for c in inner:
                yield c
                raise RuntimeError("GPU fell off the bus")

        return gen()

    engine.astream = breaking

    async def main() -> str:
        pool = ModelPool(LoadSettings())
        pool.add_engine(engine)
        app = create_app(pool, ServerSettings())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": engine.name, "messages": HELLO, "stream": True, "max_tokens": 5},
            )
            return r.text

    text = asyncio.run(main())
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith("event: error\ndata: ")
    assert "GPU fell off the bus" in json.loads(events[-2].split("data: ", 1)[1])["error"]["message"]


def test_non_loopback_without_key_is_refused():
    from cli import llmhost

    out = llmhost("serve", "--host", "0.0.0.0")
    assert out.returncode == 2
    assert "--insecure-no-auth" in out.stderr and "--api-key" in out.stderr


@pytest.mark.slow
class TestEmbeddedServer:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, embedded_dir):
        s = ServerProcess("--max-concurrency", "2", "--max-queue", "1", "--drain-timeout", "60")
        yield s
        s.stop()

    def test_health_is_fast_during_generation_and_disconnect_cancels(self, server):
        with server.http() as http:
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "smollm2-135m-instruct",
                    "stream": True,
                    "max_tokens": 400,
                    "temperature": 0,
                    "messages": [
                        {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
                    ],
                },
            ) as r:
                lines = r.iter_lines()
                next(lines)
                for _ in range(5):
                    t = time.perf_counter()
                    assert http.get("/health").status_code == 200
                    assert time.perf_counter() - t < 0.2
                assert metric(http.get("/metrics").text, "llmhost_running_requests") == 1
            # leaving the block closes the connection mid-stream
            assert wait_for(lambda: metric(http.get("/metrics").text, "llmhost_running_requests") == 0, 2.0)

    def test_disconnect_during_non_streaming_request_cancels(self, server):
        body = {
            "model": "smollm2-135m-instruct",
            "max_tokens": 400,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
            ],
        }
        with server.http() as http:
            with (
                pytest.raises(httpx.ReadTimeout),
                httpx.Client(base_url=server.url, timeout=1.0) as impatient,
            ):
                impatient.post("/v1/chat/completions", json=body)
            assert wait_for(lambda: metric(http.get("/metrics").text, "llmhost_running_requests") == 0, 2.0)

    def test_queue_full_gives_503_with_retry_after(self, server):
        body = {
            "model": "smollm2-135m-instruct",
            "stream": True,
            "max_tokens": 200,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
            ],
        }
        with (
            server.http() as http,
            http.stream("POST", "/v1/chat/completions", json=body) as a,
            http.stream("POST", "/v1/chat/completions", json=body) as b,
        ):
            la, lb = a.iter_lines(), b.iter_lines()  # kept: a dropped iterator closes its stream
            next(la), next(lb)  # two running (max concurrency 2)
            with http.stream("POST", "/v1/chat/completions", json=body) as c:  # one queued (max queue 1)
                assert wait_for(lambda: metric(http.get("/metrics").text, "llmhost_queue_length") == 1, 5)
                r = http.post("/v1/chat/completions", json={**body, "stream": False})
                assert r.status_code == 503 and r.headers["Retry-After"]
                assert r.json()["error"]["code"] == "server_busy"
                c.close()

    def test_sigterm_drains_in_flight_and_refuses_new(self, server):
        with server.http() as http:  # the streams closed by the previous test have left
            idle = lambda: metric(http.get("/metrics").text, "llmhost_running_requests") == 0  # noqa: E731
            assert wait_for(idle, 5)
        body = {
            "model": "smollm2-135m-instruct",
            "stream": True,
            "max_tokens": 120,  # ≈5 s: still running when the late request comes
            "temperature": 0,
            "messages": [
                {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
            ],
        }
        with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: "draining" in server.log, 5)
            late = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert late.status_code == 503
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest and rest[-1] == "data: [DONE]", server.log
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
        # the access log (batched) has every request, the refused one too, written by the exit
        refused = '"POST /v1/chat/completions HTTP/1.1" 503'
        assert wait_for(lambda: refused in server.log, 5), server.log


def test_the_message_shapes_real_clients_send(tiny_server, model_name):
    """Open WebUI and LangChain send content as a list of parts; the SDK's `developer` role is
    the system prompt; clients' harmless defaults (logprobs/store false, text format) are fine."""
    client = tiny_server.client("sekret")
    plain = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        temperature=0,
        max_tokens=8,
    )
    parts = client.chat.completions.create(
        model=model_name,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("Hello ", "there")]},
        ],
        temperature=0,
        max_tokens=8,
        logprobs=False,
        store=False,
        metadata={"user": "test"},
        response_format={"type": "text"},
        parallel_tool_calls=True,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
            "reads text only",
        ),
        ({"n": 2}, "n", "less than or equal to 1"),
        ({"modalities": ["audio"]}, "modalities", "unknown parameter"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(tiny_server, model_name, extra, param, fragment):
    body = {"model": model_name, "messages": HELLO, **extra}
    with tiny_server.http(headers={"Authorization": "Bearer sekret"}) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and fragment in r.json()["error"]["message"]
