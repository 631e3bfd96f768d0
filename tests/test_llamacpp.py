"""The llama.cpp engine on the embedded GGUF (no conversion), through the same chunk type,
parameters and scheduler as the transformers engine. Needs `pip install llmhost[llamacpp]`."""

from __future__ import annotations

import threading

import pytest

from llmhost.config import LoadSettings
from llmhost.engine import load
from llmhost.engine.llamacpp import INSTALL, available
from llmhost.engine.params import GenerationParams

pytestmark = pytest.mark.skipif(not available(), reason=f"llama-cpp-python is not installed: {INSTALL}")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def cpp():
    engine = load(None, LoadSettings(engine="llamacpp", context_length=2048))
    yield engine
    engine.close()


def test_greedy_equals_the_bindings_own_sampler(cpp) -> None:
    """llmhost samples from llama.cpp's logits; under greedy decoding that must give exactly what
    llama-cpp-python's own sampler gives. (Its Q4_1 kernels answer differently from the float32
    transformers model: this 135M model is that sensitive.)"""
    result = cpp.generate(QUESTION, GenerationParams(temperature=0, max_new_tokens=20))
    llm, native = cpp.llm, []
    llm.reset()
    for tok in llm.generate(cpp.encode_chat(QUESTION), temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if tok in cpp.eos_ids or len(native) == 20:
            break
        native.append(tok)
    assert result.token_ids[: len(native)] == native and result.text.strip()
    assert result.prompt_tokens == len(cpp.encode_chat(QUESTION)) and result.completion_tokens == len(
        result.token_ids
    )
    assert result.ttft_s is not None and result.decode_tps and result.decode_tps > 0
    assert cpp.name == "smollm2-135m-instruct" and cpp.context_length == 2048


def test_stream_equals_generate_and_is_deterministic(cpp) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=24)
    whole = cpp.generate(STORY, params)
    parts = list(cpp.stream(STORY, params))
    assert "".join(c.text for c in parts) == whole.text == cpp.generate(STORY, params).text
    assert parts[-1].finish_reason == "length" and parts[-1].completion_tokens == 24


def test_seeded_sampling_repeats(cpp) -> None:
    params = GenerationParams(temperature=0.9, top_p=0.95, seed=1234, max_new_tokens=16)
    assert cpp.generate(STORY, params).text == cpp.generate(STORY, params).text


def test_stop_strings_never_leak(cpp) -> None:
    full = cpp.generate(STORY, GenerationParams(temperature=0, max_new_tokens=40)).text
    stop = full.split()[4]
    cut = cpp.generate(STORY, GenerationParams(temperature=0, max_new_tokens=40, stop=[stop]))
    assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"


def test_cancel_and_queue(cpp) -> None:
    cancel = threading.Event()
    seen = []
    for chunk in cpp.stream(STORY, GenerationParams(temperature=0, max_new_tokens=400), cancel=cancel):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 100
    a = cpp.stream(QUESTION, GenerationParams(temperature=0, max_new_tokens=8))
    b = cpp.stream(QUESTION, GenerationParams(temperature=0, max_new_tokens=8))
    assert "".join(c.text for c in a) == "".join(c.text for c in b)  # one at a time, same answer


def test_raw_prompt_and_chinese(cpp) -> None:
    text = cpp.generate(
        None, GenerationParams(temperature=0, max_new_tokens=8), prompt="Once upon a time"
    ).text
    assert text.strip()
    reply = cpp.generate(
        [{"role": "user", "content": "你好"}], GenerationParams(temperature=0, max_new_tokens=16)
    )
    assert "\ufffd" not in reply.text


def test_serve_with_llamacpp_through_the_official_client() -> None:
    from servers import ServerProcess, metric

    server = ServerProcess("--engine", "llamacpp", "--context-length", "2048")
    try:
        client = server.client()
        kw = {"model": "smollm2-135m-instruct", "messages": QUESTION, "temperature": 0, "max_tokens": 12}
        whole = client.chat.completions.create(**kw)
        parts = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        ]
        assert "".join(parts) == whole.choices[0].message.content and whole.usage.completion_tokens <= 12
        with server.http() as http:
            assert metric(http.get("/metrics").text, "llmhost_queue_length") == 0
    finally:
        assert server.stop() == 0, server.log
