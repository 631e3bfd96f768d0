"""llama.cpp's GPU offload (engine/backends/llamacpp/offload.py): the layers given to the GPU, from
the GGUF's own metadata and the free GPU memory. This machine's llama-cpp-python is a CPU build:
the rule is tested on its inputs, and the real binding is checked to receive the layer count
(a CPU build accepts it and computes on the CPU, as a GPU build does for the layers it keeps)."""

from __future__ import annotations

import logging

import pytest

from cli import llmhost
from llmhost.config import LoadSettings
from llmhost.engine import load
from llmhost.engine.backends.llamacpp import INSTALL, available, kv_bytes_per_token, offload
from llmhost.engine.params import GenerationParams
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.store.embedded import embedded_gguf

pytestmark = pytest.mark.skipif(not available(), reason=f"llama-cpp-python is not installed: {INSTALL}")
GIB = 2**30


def test_layers_that_fit() -> None:
    file, kv = 4 * GIB, GIB // 2  # a 7B in 4 bits: 28 layers, a 0.5 GiB KV cache
    per_layer = file / 29 + kv / 28
    assert offload.layers_that_fit(28, file, kv, free_gib=8.0) == -1  # all, the output layer too
    assert offload.layers_that_fit(28, file, kv, free_gib=3.0) == int((3.0 - 0.75) * GIB // per_layer)
    assert 0 < offload.layers_that_fit(28, file, kv, free_gib=3.0) < 28
    assert offload.layers_that_fit(28, file, kv, free_gib=0.5) == 0  # less than the reserve


def test_facts_read_a_chat_model() -> None:
    facts = offload.read_facts(embedded_gguf()[0])
    assert facts.pooling is None and not facts.classifier and facts.arch == "llama"


def test_plan_on_a_cpu_build() -> None:
    facts = offload.read_facts(embedded_gguf()[0])
    gguf = embedded_gguf()[0]
    assert offload.plan(LoadSettings(), facts, gguf) == offload.Offload(0, "cpu", "a CPU build of llama.cpp")
    with pytest.raises(InvalidRequestError, match=r"CPU build.*-DGGML_CUDA=on"):
        offload.plan(LoadSettings(n_gpu_layers=8), facts, gguf)
    assert offload.plan(LoadSettings(n_gpu_layers=0), facts, gguf).layers == 0


def test_plan_on_a_gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = embedded_gguf()[0]
    facts = offload.read_facts(gguf)
    monkeypatch.setattr(offload, "supports_gpu", lambda: True)
    monkeypatch.setattr(offload, "free_gpu_gib", lambda: (6.0, "cuda"))
    assert offload.plan(LoadSettings(), facts, gguf) == offload.Offload(
        -1, "cuda", "6.0 GiB of GPU memory free"
    )
    tight = facts.kv_bytes(LoadSettings()) / GIB + 0.75 + 0.03  # the KV cache fits, few layers do
    monkeypatch.setattr(offload, "free_gpu_gib", lambda: (tight, "cuda"))
    some = offload.plan(LoadSettings(), facts, gguf)
    assert (
        0 < some.layers < facts.layers and some.device == f"cuda ({some.layers}/{facts.layers} layers) + cpu"
    )
    assert offload.plan(LoadSettings(device="cpu"), facts, gguf).layers == 0
    assert offload.plan(LoadSettings(n_gpu_layers=7), facts, gguf).layers == 7
    assert offload.plan(LoadSettings(n_gpu_layers=-1), facts, gguf).layers == -1
    monkeypatch.setattr(offload, "free_gpu_gib", lambda: (None, "gpu"))  # ROCm, Vulkan: unknown
    assert offload.plan(LoadSettings(), facts, gguf).layers == -1


def test_the_kv_cache_counted_is_the_one_allocated() -> None:
    facts = offload.read_facts(embedded_gguf()[0])
    assert (
        facts.kv_bytes(LoadSettings(max_concurrency=2, context_length=1024))
        == 2 * 1024 * facts.kv_bytes_per_token
    )
    assert facts.kv_bytes(LoadSettings(kv_cache_gib=0.5)) == GIB // 2


def test_the_binding_gets_the_planned_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "supports_gpu", lambda: True)
    monkeypatch.setattr(
        offload, "free_gpu_gib", lambda: (0.8, "cuda")
    )  # ≈50 MiB beside the reserve: half the layers
    settings = LoadSettings(engine="llamacpp", context_length=256, max_concurrency=1)
    facts = offload.read_facts(embedded_gguf()[0])
    planned = offload.plan(settings, facts, embedded_gguf()[0])
    assert 0 < planned.layers < facts.layers
    engine = load(None, settings)
    try:
        import llama_cpp

        # the header read is llama.cpp's own view of the model
        assert facts.layers == llama_cpp.llama_model_n_layer(engine.llm.model)
        assert facts.kv_bytes_per_token == kv_bytes_per_token(engine.llm)
        assert engine.llm.model_params.n_gpu_layers == planned.layers
        assert engine.placement == planned.device
        r = engine.generate(
            GenerationRequest([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=4))
        )
        assert r.completion_tokens > 0
    finally:
        engine.close()


def test_a_load_that_fails_on_the_gpu_runs_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from llmhost.engine.backends.llamacpp import repack

    monkeypatch.setattr(offload, "supports_gpu", lambda: True)
    monkeypatch.setattr(offload, "free_gpu_gib", lambda: (None, "cuda"))
    real = repack.open_model
    tries = []

    def no_gpu_memory(gguf, use, **kw):
        tries.append(kw["n_gpu_layers"])
        if kw["n_gpu_layers"] != 0:
            raise ValueError("Failed to load model from file")  # what the binding says on an OOM
        return real(gguf, use, **kw)

    monkeypatch.setattr(repack, "open_model", no_gpu_memory)
    with caplog.at_level(logging.WARNING, "llmhost.llamacpp"):
        engine = load(None, LoadSettings(engine="llamacpp", context_length=256, max_concurrency=1))
    try:
        assert tries == [-1, 0] and engine.placement == "cpu"  # this build's placement, as on any CPU
        assert "runs on the CPU instead" in caplog.text
    finally:
        engine.close()


def test_the_cli_refuses_gpu_layers_on_a_cpu_build(tmp_path) -> None:
    r = llmhost("generate", "--engine", "llamacpp", "--n-gpu-layers", "10", "Hi", home=tmp_path)
    assert r.returncode != 0
    assert "CPU build" in r.stderr and "Traceback" not in r.stderr


def test_a_truncated_header_is_a_read_error(tmp_path) -> None:
    from llmhost.engine.backends.gguf import GGUFReadError

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(embedded_gguf()[0].read_bytes()[:50_000])  # inside the vocabulary's array
    with pytest.raises(GGUFReadError, match="ends inside its header"):
        offload.read_facts(cut)
    (tmp_path / "no.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(GGUFReadError, match="no GGUF magic"):
        offload.read_facts(tmp_path / "no.gguf")
