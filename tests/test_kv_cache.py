"""`--kv-cache f16|q8_0|q4_0`: llama.cpp's quantized KV cache, counted by `estimate`, the pool's
budget, the offload plan and `doctor`; refused by the engines that keep 16 bits."""

from __future__ import annotations

import pytest

from llmhost.config import KV_ELEMENT_BYTES, LoadSettings
from llmhost.engine import load
from llmhost.engine.backends.llamacpp import INSTALL, available, kv_bytes_per_token, slot_tokens
from llmhost.engine.params import GenerationParams
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.store.catalog import catalog
from llmhost.store.doctor import fits
from llmhost.store.estimate import estimate, shape_of
from test_llamacpp import (
    test_a_conversations_next_turn_reuses_its_prefix_and_equals_a_cold_run as exact_turns,
)

needs_llamacpp = pytest.mark.skipif(not available(), reason=f"llama-cpp-python is not installed: {INSTALL}")
GIB = 2**30


def test_estimate_counts_the_cache_type() -> None:
    shape = shape_of(catalog()["qwen-7b-chat"])  # 32 layers × 32 KV heads × 128: a large cache
    f16 = estimate(shape, "q4_k_m", 4096)
    q8 = estimate(shape, "q4_k_m", 4096, kv_cache="q8_0")
    assert f16.kv_cache_gib == pytest.approx(2 * 32 * 32 * 128 * 4096 * 2 / GIB)  # 2 GiB
    assert q8.kv_cache_gib == pytest.approx(f16.kv_cache_gib * 34 / 64)
    assert q8.weights_gib == f16.weights_gib and (q8.kv_cache, f16.kv_cache) == ("q8_0", "f16")


def test_doctor_offers_the_8_bit_cache_when_only_it_fits() -> None:
    entry = catalog()["qwen2.5-7b-instruct"]
    shape = shape_of(entry)
    f16 = estimate(shape, "q4_k_m", 32768, gpu=True).total_gib
    q8 = estimate(shape, "q4_k_m", 32768, gpu=True, kv_cache="q8_0").total_gib
    [fit] = fits([entry], (f16 + q8) / 2, gpu=True, context=32768)  # a 32k conversation on a small card
    assert fit.dtype == "q4_k_m --kv-cache q8_0" and fit.room_gib >= 0
    [roomy] = fits([entry], f16 + 1, gpu=True, context=32768)
    assert "--kv-cache" not in roomy.dtype


def test_the_engines_that_keep_16_bits_refuse_it(tiny_dir) -> None:
    with pytest.raises(InvalidRequestError, match=r"--kv-cache q8_0 is llama\.cpp's.*transformers engine"):
        load(str(tiny_dir), LoadSettings(kv_cache="q8_0"))
    with pytest.raises(InvalidRequestError, match="kv-cache-dtype fp8"):
        load(str(tiny_dir), LoadSettings(kv_cache="q8_0", engine="vllm"))


def test_estimate_command_takes_the_cache_type(tmp_path) -> None:
    from cli import llmhost

    r = llmhost(
        "estimate", "qwen-7b-chat", "--context", "4096", "--kv-cache", "q8_0", "--json", home=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert all(row["kv_cache"] == "q8_0" for row in __import__("json").loads(r.stdout))
    bad = llmhost("estimate", "qwen-7b-chat", "--kv-cache", "q2", home=tmp_path)
    assert bad.returncode == 2 and "one of f16, q8_0, q4_0" in bad.stderr


@pytest.fixture(scope="module")
def q8():
    engine = load(None, LoadSettings(engine="llamacpp", context_length=2048, kv_cache="q8_0"))
    yield engine
    engine.close()


@needs_llamacpp
def test_the_cache_holds_8_bit_blocks(q8) -> None:
    import llama_cpp

    f16 = load(None, LoadSettings(engine="llamacpp", context_length=2048, max_concurrency=1))
    try:
        question = [{"role": "user", "content": "Name three rivers in China and say where each rises."}]
        params = GenerationParams(temperature=0, max_new_tokens=16)
        sizes = {}
        for engine in (f16, q8):
            r = engine.generate(GenerationRequest(question, params))
            assert r.text.strip()
            runner = engine.scheduler.runner
            slot = next(s for s in runner.slots if s.tokens)  # the slot that served it
            sizes[engine.kv_cache] = llama_cpp.llama_state_seq_get_size(runner.ctx, slot.id)
    finally:
        f16.close()
    # the sequence's saved state is mostly its cache: q8_0's is ≈34/64 of f16's
    assert sizes["q8_0"] < 0.6 * sizes["f16"], sizes
    assert q8.facts()["kv_cache"] == "q8_0" and f16.kv_cache == "f16"


@needs_llamacpp
def test_the_same_memory_holds_more_tokens(q8) -> None:
    per_token = kv_bytes_per_token(q8.llm, "f16")
    assert kv_bytes_per_token(q8.llm, "q8_0") == int(per_token / 2 * KV_ELEMENT_BYTES["q8_0"])
    f16_tokens = slot_tokens(q8.llm, 8192, False, 0.25, 4, "f16")
    q8_tokens = slot_tokens(q8.llm, 8192, False, 0.25, 4, "q8_0")
    assert q8_tokens == pytest.approx(f16_tokens * 64 / 34, rel=0.01)


@needs_llamacpp
def test_a_quantized_cache_keeps_the_exact_prefix_cache_exact(q8) -> None:
    # a next turn reuses the kept cells and still equals a cold run with the same cache type
    exact_turns(q8)
