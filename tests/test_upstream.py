"""`--engine openai`: llmhost in front of another OpenAI-compatible server (here a real
`llmhost serve` subprocess as the upstream), with its own keys, names, metrics and errors."""

from __future__ import annotations

import json

import openai
import pytest

from cli import llmhost
from servers import LocalServer, metric

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def upstream(tiny_dir):
    server = LocalServer(str(tiny_dir), "--dtype", "float32", "--api-key", "upstream-key")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def front(upstream):
    server = LocalServer(
        "--engine", "openai", "--upstream", upstream.url + "/v1", "--upstream-key", "upstream-key",
        "--api-key", "front-key",
    )  # fmt: skip
    yield server
    server.stop()


def test_front_serves_the_upstream_models_with_its_own_key(front, upstream, tiny_dir) -> None:
    assert [m.id for m in front.client("front-key").models.list().data] == [tiny_dir.name]
    with pytest.raises(openai.AuthenticationError):
        front.client("upstream-key").models.list()  # the upstream's key is not the front's


def test_replies_equal_the_upstream_streaming_or_not(front, upstream, tiny_dir) -> None:
    kw = {"model": tiny_dir.name, "messages": HELLO, "temperature": 0, "max_tokens": 16, "seed": 1}
    direct = upstream.client("upstream-key").chat.completions.create(**kw)
    via = front.client("front-key").chat.completions.create(**kw)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.completion_tokens == direct.usage.completion_tokens == 16
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    parts = []
    for chunk in front.client("front-key").chat.completions.create(**kw, stream=True):
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "".join(parts) == direct.choices[0].message.content
    text = front.client("front-key").completions.create(
        model=tiny_dir.name, prompt="Once upon", max_tokens=5, temperature=0
    )
    assert (
        text.choices[0].text
        == upstream.client("upstream-key")
        .completions.create(model=tiny_dir.name, prompt="Once upon", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )


def test_upstream_errors_keep_the_openai_shape(front, tiny_dir) -> None:
    client = front.client("front-key")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=tiny_dir.name, messages=HELLO, max_tokens=5000)
    assert "the upstream refused the request" in info.value.message and "context window" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with front.http() as http:
        text = http.get("/metrics", headers={"Authorization": "Bearer front-key"}).text
    assert metric(text, 'llmhost_requests_total{route="/v1/chat/completions",status="200"}') >= 1


def test_cli_generate_through_an_upstream(upstream, tiny_dir) -> None:
    engine = ["--engine", "openai", "--upstream", upstream.url + "/v1", "--upstream-key", "upstream-key"]
    args = ["generate", tiny_dir.name, "Hi", *engine, "--temperature", "0", "--max-new-tokens", "4", "--json"]
    r = llmhost(*args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == tiny_dir.name and out["usage"]["completion_tokens"] == 4


def test_a_dead_upstream_gives_503_and_a_clear_message(tiny_dir) -> None:
    up = LocalServer(str(tiny_dir), "--dtype", "float32")
    front = LocalServer("--engine", "openai", "--upstream", up.url + "/v1")
    try:
        up.stop()
        with pytest.raises(openai.InternalServerError) as info:
            front.client().chat.completions.create(model=tiny_dir.name, messages=HELLO, max_tokens=4)
        assert info.value.status_code == 503 and "cannot be reached" in info.value.message
    finally:
        front.stop()
    r = llmhost("generate", "x", "hi", "--engine", "openai")
    assert r.returncode == 2 and "--engine openai needs --upstream URL" in r.stderr
