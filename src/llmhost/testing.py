"""Models built for tests and benchmarks (as `numpy.testing` or transformers' testing utilities
are): a tiny random Llama with the embedded model's real tokenizer, and random LoRA adapters.
torch, transformers and peft load lazily; nothing else in llmhost imports this module."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    config = LlamaConfig(
        **{**shape, **overrides},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def build_adapter(
    out: Path, base_dir: Path, seed: int, rank: int = 4, every_projection: bool = False, scale: float = 0.3
) -> Path:
    """A LoRA adapter for the model in `base_dir` with random (non-zero) weights, saved as peft
    saves one: each seed steers the model its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    if every_projection:  # as `llmhost finetune` trains them
        targets += ["k_proj", "gate_proj", "up_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, scale)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
