"""`--kv-cache f16|q8_0|q4_0`: llama.cpp's quantized KV cache, counted by `estimate`, the pool's
budget, the offload plan and `doctor`; q8_0 on the transformers engine too (the same blocks, in
torch); refused by the engines that keep 16 bits."""

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
    # 16-bit weights keep them with the 8-bit cache (the transformers engine's too) before 8-bit weights
    small = catalog()["qwen2.5-1.5b-instruct"]
    full = estimate(shape_of(small), "bfloat16", 32768, gpu=True).total_gib
    halved = estimate(shape_of(small), "bfloat16", 32768, gpu=True, kv_cache="q8_0").total_gib
    [fit] = fits([small], (full + halved) / 2, gpu=True, context=32768)
    assert fit.dtype == "bfloat16 --kv-cache q8_0" and fit.room_gib >= 0
    assert fits([small], full + 0.1, gpu=True, context=32768)[0].dtype == "bfloat16"


def test_the_engines_that_keep_16_bits_refuse_it(tiny_dir) -> None:
    with pytest.raises(InvalidRequestError, match=r"--kv-cache q4_0 is llama\.cpp's.*keeps f16 or q8_0"):
        load(str(tiny_dir), LoadSettings(kv_cache="q4_0"))
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


# -- q8_0 on the transformers engine (engine/backends/hf_kvcache.py) ------------------------------


def test_transformers_q8_0_holds_llama_cpp_blocks() -> None:
    """int8 values with an f16 scale per 32 (34 bytes per 32 values), each value within half a
    step of what went in; new positions are appended, the old ones read back unchanged."""
    import torch

    from llmhost.engine.backends.hf_kvcache import Q8Layer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64) * torch.tensor([0.01, 1.0, 300.0]).view(1, 3, 1, 1)
    x[0, 0, 0] = 0  # a block of zeros: a zero scale, zeros back
    layer = Q8Layer(64, torch.float32)
    keys, values = layer.update(x, -x)
    assert layer.keys.dtype == torch.int8 and layer.keys.nbytes == x.numel() * 34 // 32
    step = x.abs().unflatten(-1, (2, 32)).amax(-1, keepdim=True) / 127
    assert ((keys - x).abs().unflatten(-1, (2, 32)) <= 0.6 * step).all()  # f16 scale: a hair over 0.5
    assert torch.equal(values, -keys) and torch.equal(keys[0, 0, 0], x[0, 0, 0])
    more, _ = layer.update(x[:, :, :1], x[:, :, :1])
    assert more.shape == (2, 3, 6, 64) and torch.equal(more[:, :, :5], keys) and layer.get_seq_length() == 6


def test_transformers_q8_0_refuses_sliding_window_models_before_their_weights(tmp_path) -> None:
    """A model with sliding-window layers (Gemma 2's config) is refused from its config, before
    its weights load: the folder's weights here are not weights at all."""
    from transformers import Gemma2Config

    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.errors import LlmhostError

    Gemma2Config(num_hidden_layers=2, architectures=["Gemma2ForCausalLM"]).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(LlmhostError, match=r"q8_0 .* gemma2 has sliding-window or recurrent layers"):
        load(str(tmp_path), LoadSettings(engine="transformers", kv_cache="q8_0"))


def test_transformers_q8_0_costs_little_perplexity_for_a_quarter_of_the_memory(embedded_dir) -> None:
    """The embedded model (float32) reads 512 tokens of this repository's README in blocks of 64,
    each attending to the cache: perplexity within 1% of the full-precision cache's (the issue's
    bound), in 34/128 of its bytes."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmhost.engine.backends.hf_folder import cache_kwarg
    from llmhost.engine.backends.hf_kvcache import new_cache

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir))
    model = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32).eval()
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer(text)["input_ids"][:513]])
    got = {}
    for kind in ("f16", "q8_0"):
        cache, nll = new_cache(model, kind), 0.0
        with torch.no_grad():
            for start in range(0, 512, 64):
                logits = model(input_ids=ids[:, start : start + 64], **{cache_kwarg(model): cache}).logits
                nll -= logits.log_softmax(-1)[0].gather(-1, ids[0, start + 1 : start + 65, None]).sum().item()
        got[kind] = (
            float(torch.tensor(nll / 512).exp()),
            sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)),
        )
    assert abs(got["q8_0"][0] / got["f16"][0] - 1) <= 0.01, got
    assert got["q8_0"][1] == got["f16"][1] * 34 // 128, got


@pytest.fixture(scope="module")
def hf_q8(embedded_dir):
    engine = load(None, LoadSettings(engine="transformers", dtype="float32", kv_cache="q8_0"))
    yield engine
    engine.close()


def test_transformers_q8_0_batches_rows_and_reuses_prefixes_exactly(hf_q8) -> None:
    """Rows of a q8_0 cache are merged, padded and dropped as 16-bit ones are: three concurrent
    greedy replies equal each alone; a conversation's turns reuse kept q8_0 blocks and equal cold
    runs (test_prefix's test, on this engine)."""
    import concurrent.futures

    from test_prefix import test_a_conversations_turns_reuse_the_last_reply_and_equal_cold_runs as turns

    assert hf_q8.facts()["kv_cache"] == "q8_0"
    params = GenerationParams(temperature=0, max_new_tokens=30)
    asks = [
        [{"role": "user", "content": q}] for q in ("Tell me about Rome.", "Name three rivers.", "Count to 5.")
    ]
    alone = [hf_q8.generate(GenerationRequest(m, params)).token_ids for m in asks]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda m: hf_q8.generate(GenerationRequest(m, params)).token_ids, asks))
    assert together == alone and hf_q8.scheduler.peak_batch >= 2
    turns(hf_q8)
