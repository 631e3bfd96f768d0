"""Each protocol's body → one GenerationRequest, and chunks → the protocol's objects: no model."""

from __future__ import annotations

import pytest

from llmhost.engine.chunks import Chunk, Result
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols import Defaults
from llmhost.server.protocols.openai_chat import ChatCompletionRequest, ChatCompletions, ChatReply
from llmhost.server.protocols.openai_common import penalty_from_openai
from llmhost.server.protocols.openai_completions import CompletionReply, CompletionRequest, to_prompt

MSGS = [{"role": "user", "content": "hi"}]


def to_params(body: ChatCompletionRequest):
    return ChatCompletions().request(body, Defaults()).params


@pytest.mark.parametrize(
    ("presence", "frequency", "expected"),
    [
        (None, None, None),
        (0.0, 0.0, None),
        (1.0, None, 1.5),
        (0.5, 2.0, 2.0),
        (-2.0, 1.0, 0.5),
        (None, -1.0, 1 / 1.5),
    ],
)
def test_openai_penalties_map_to_repetition_penalty(presence, frequency, expected):
    got = penalty_from_openai(presence, frequency)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_to_params_maps_every_field():
    req = ChatCompletionRequest(
        model="m",
        messages=MSGS,
        max_tokens=9,
        max_completion_tokens=7,
        temperature=0.3,
        top_p=0.5,
        top_k=4,
        seed=3,
        stop="END",
        presence_penalty=1.0,
    )
    p = to_params(req)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.3, 0.5, 4, 3)
    assert p.stop == ["END"] and p.repetition_penalty == 1.5
    assert p.truncate_history is False  # API callers get an error, not silently dropped turns
    explicit = to_params(
        ChatCompletionRequest(model="m", messages=MSGS, repetition_penalty=1.2, presence_penalty=2)
    )
    assert explicit.repetition_penalty == 1.2


def test_defaults_when_fields_are_left_out():
    p = to_params(ChatCompletionRequest(model="m", messages=MSGS))
    assert p.max_new_tokens == 512 and p.stop == [] and p.repetition_penalty == 1.0


def test_prompt_forms():
    assert to_prompt(CompletionRequest(model="m", prompt="abc")) == "abc"
    assert to_prompt(CompletionRequest(model="m", prompt=["abc"])) == "abc"
    with pytest.raises(InvalidRequestError, match="one prompt per request"):
        to_prompt(CompletionRequest(model="m", prompt=["a", "b"]))


def test_objects_have_openai_shape():
    chat, text = ChatReply("m", include_usage=True), CompletionReply("m")
    [first] = chat.chunk_objects(Chunk(text="He"))
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"content": "He", "role": "assistant"}
    assert chat.chunk_objects(Chunk(text="")) == []  # a chunk that adds nothing sends nothing
    [last] = chat.chunk_objects(
        Chunk(text="", finish_reason="cancelled", prompt_tokens=3, completion_tokens=2)
    )
    assert last["choices"][0]["finish_reason"] == "stop" and last["id"] == first["id"]
    usage = chat.usage_chunk(Chunk(text="", prompt_tokens=3, completion_tokens=2))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    whole = text.whole(
        Result(
            text="ok",
            finish_reason="length",
            prompt_tokens=1,
            completion_tokens=4,
            ttft_s=None,
            decode_tps=None,
        )
    )
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"][0] == {"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length"}


def test_a_chat_body_is_one_request_value():
    """The request carries the messages (developer as system, text parts joined), the model name
    and every parameter; the server's reasoning default applies where the body is silent."""
    body = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    request = ChatCompletions().request(body, Defaults(reasoning=False))
    assert request.model == "m" and request.chat and request.prompt is None
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert request.params.max_new_tokens == 5 and request.params.reasoning is False
    effort = body.model_copy(update={"reasoning_effort": "high"})
    assert ChatCompletions().request(effort, Defaults(reasoning=False)).params.reasoning is True


def test_a_streamed_reply_ends_with_usage_then_done():
    reply = ChatReply("m", include_usage=True)
    frames = [*reply.events(Chunk(text="hi")), *reply.events(Chunk(text="", finish_reason="stop"))]
    frames += list(reply.end())
    assert frames[-1] == "data: [DONE]\n\n"
    assert '"choices": []' in frames[-2] and '"total_tokens"' in frames[-2]
    assert all(f.startswith("data: ") for f in frames)


def test_cl100k_that_cannot_be_fetched_is_a_quick_400_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken downloads cl100k_base with no timeout: behind a firewall that drops packets the
    request is answered after `wait` seconds, the next ones at once, and a later try succeeds."""
    import threading
    import time

    import tiktoken

    from llmhost.server.protocols.openai_embeddings import Cl100k

    released, calls = threading.Event(), []

    def dropped(name: str):
        calls.append(name)
        released.wait(30)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", dropped)
    loader = Cl100k(wait=0.2, retry=60)
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match=r"no answer from its download in 0.2 s\): send text"):
        loader.get()
    with pytest.raises(InvalidRequestError, match="no answer"):
        loader.get()  # remembered: no second download, no second wait
    assert time.perf_counter() - start < 10 and calls == ["cl100k_base"]
    released.set()
    assert isinstance(loader._loading.exception(timeout=30), ConnectionError)  # the first try ends
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: f"the {name} encoding")
    loader.retry = 0  # the remembered failure has expired: a new try, which is kept
    assert loader.get() == loader.get() == "the cl100k_base encoding"
