"""The llama.cpp engine on the embedded GGUF (no conversion), through the same chunk type,
parameters and scheduler as the transformers engine. Needs `pip install llmhost[llamacpp]`."""

from __future__ import annotations

import threading

import pytest

from llmhost.config import LoadSettings
from llmhost.engine import load
from llmhost.engine.backends.llamacpp import INSTALL, available
from llmhost.engine.params import GenerationParams
from servers import wait_for

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
    from llama_cpp import Llama

    from llmhost.engine.backends.llamacpp import physical_cores
    from llmhost.store.embedded import embedded_gguf

    result = cpp.generate(QUESTION, GenerationParams(temperature=0, max_new_tokens=20))
    # the binding's own single-sequence context, with the window and batch size llmhost uses
    llm = Llama(
        model_path=str(embedded_gguf()[0]),
        n_ctx=2048,
        n_batch=512,
        flash_attn=True,
        n_threads=physical_cores(),
        verbose=False,
    )
    native = []
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


def test_cancel(cpp) -> None:
    cancel = threading.Event()
    seen = []
    for chunk in cpp.stream(STORY, GenerationParams(temperature=0, max_new_tokens=400), cancel=cancel):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 100
    assert wait_for(lambda: cpp.running == 0, 2)  # the slot is freed at the next step


def test_concurrent_requests_decode_together_and_equal_solo(cpp) -> None:
    """llama.cpp's multi-sequence batching: several requests per decode call, each in a KV window
    of its own, so a reply does not depend on what else is running."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [STORY, QUESTION, [{"role": "user", "content": "Name three animals."}], STORY]
    params = GenerationParams(temperature=0, max_new_tokens=32)
    solo = [cpp.generate(p, params).token_ids for p in prompts]
    cpp.scheduler.peak_batch = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: cpp.generate(p, params).token_ids, prompts))
    assert together == solo
    assert cpp.scheduler.peak_batch >= 3


def test_logits_do_not_depend_on_other_sequences_in_the_cache(cpp) -> None:
    """The runner's two guards against llama.cpp's shared cache (see LlamaCppRunner): a request's
    logits, teacher-forced, are bit-identical alone and beside others that start before it and
    finish while it decodes. (Without flash attention they were off by up to ~26; removing a
    finished sequence's cells mid-batch shifted them by ~1.)"""
    from types import SimpleNamespace

    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores

    def request(text: str, budget: int = 64) -> SimpleNamespace:
        ids = cpp.encode_chat([{"role": "user", "content": text}])
        return SimpleNamespace(
            prompt_ids=ids, seq=SimpleNamespace(params=SimpleNamespace(max_new_tokens=budget))
        )

    runner = LlamaCppRunner(cpp.llm, 2048, 8192, 4, physical_cores())
    try:
        a = request("What is the capital of France?")
        alone = [runner.prefill(a)]
        runner.commit_prefill()
        forced = [int(alone[0].argmax())]
        for _ in range(20):
            a.last_token = forced[-1]
            alone.append(runner.step([a])[0])
            forced.append(int(alone[-1].argmax()))
        runner.drop([])
        rows = [request("Write a story about a dragon."), request("Count to ten.")]
        for other in rows:
            other.last_token = int(runner.prefill(other).argmax())
            runner.commit_prefill()
        beside = [runner.prefill(a)]
        runner.commit_prefill()
        rows.append(a)
        for i in range(20):
            a.last_token = forced[i]
            logits = runner.step(rows)
            beside.append(logits[-1])
            for row, other in enumerate(rows[:-1]):
                other.last_token = int(logits[row].argmax())
            if i == 5:  # the dragon story ends while the others decode
                runner.drop([1, 2])
                rows = rows[1:]
        assert max(float((x - y).abs().max()) for x, y in zip(alone, beside, strict=True)) == 0.0
    finally:
        runner.close()


def test_kv_budget_decides_how_many_run_together_and_the_rest_queue(cpp) -> None:
    from llmhost.engine.backends.llamacpp import kv_bytes_per_token, kv_capacity

    per_token = kv_bytes_per_token(cpp.llm)
    assert per_token == 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16
    assert kv_capacity(cpp.llm, 8192, None, 8) == 8192  # by default one window, as llama.cpp alone
    assert kv_capacity(cpp.llm, 8192, 1, 8) == 2**30 // per_token  # what 1 GiB buys
    assert kv_capacity(cpp.llm, 2048, 1, 8) == 2048 * 8  # no more than 8 full windows
    assert kv_capacity(cpp.llm, 8192, 0.001, 8) == 8192  # always one full window
    # a cache of 2 windows of 512: two requests of 400 fit at their longest; the third waits
    small = LoadSettings(
        engine="llamacpp", context_length=512, max_concurrency=4, kv_cache_gib=512 * 2 * per_token / 2**30
    )
    engine = load(None, small)
    try:
        assert engine.scheduler.runner.capacity == 1024
        params = GenerationParams(temperature=0, max_new_tokens=400 - len(engine.encode_chat(STORY)))
        streams = [engine.stream(STORY, params) for _ in range(3)]
        firsts = [next(s).text for s in streams[:2]] + [""]
        assert engine.running == 2 and engine.queued == 1  # in /metrics as llmhost_queue_length
        texts = {first + "".join(c.text for c in s) for first, s in zip(firsts, streams, strict=True)}
        assert len(texts) == 1  # the one that waited got the same reply
    finally:
        engine.close()


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
