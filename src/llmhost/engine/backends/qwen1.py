"""Qwen-1 (`QWenLMHeadModel`: Qwen-1.8B-Chat, Qwen-7B-Chat, ...) → a transformers Qwen2 folder,
converted once and cached, so the tutorial's models run without their remote code (which no
longer runs under transformers 5) on every engine.

Qwen-1 maps exactly onto the Qwen2 architecture: the same RMSNorm, rotary embedding and biases
(q, k, v with bias; o without); the fused `c_attn` splits into q, k, v (in that order); the MLP
computes `w1(x) * silu(w2(x))`, so `w2` is the gate and `w1` the up projection, and the config's
`intermediate_size` counts both halves. Only past `seq_length`, where Qwen-1 applies dynamic NTK
and logn scaling, would the two differ: the converted model's context is `seq_length`.

The tokenizer is rebuilt from `qwen.tiktoken` (ranks of byte sequences) as a byte-level BPE with
Qwen-1's split pattern, NFC normalization and special tokens; the chat template renders what
Qwen-1's `make_context` builds (ChatML, default system prompt "You are a helpful assistant.").
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from llmhost.engine.cached import build_once
from llmhost.errors import LlmhostError

ARCHITECTURE = "QWenLMHeadModel"
VERSION = "1"  # of the conversion: a fix to it converts again
# Qwen-1's tokenization_qwen.py: its split pattern, and the special tokens after the 151643 ranks
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
DEFAULT_SYSTEM = "You are a helpful assistant."
# transformers renders with trim_blocks: every newline is written as a string, never as template text
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for message in messages -%}"
    "{{- '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class QwenConversionError(LlmhostError):
    """A Qwen-1 layout llmhost cannot convert."""


class QwenReadError(QwenConversionError):
    """A file of the model could not be read (its reference says how to mend it)."""


def is_qwen1(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "qwen"


def converted_folder(source: Path, cache_root: Path) -> Path:
    """The Qwen2 folder for the Qwen-1 folder `source`, converting it first if needed (into a
    temporary folder renamed into place: an interrupted conversion never leaves one that loads)."""
    target = cache_root / f"{source.name}-qwen2-{_key(source)}"
    return build_once(target, lambda out: convert(source, out), source, QwenReadError, (QwenConversionError,))


def _key(source: Path) -> str:
    """Identity of the source: each file's name, size and mtime (a re-pull changes it)."""
    parts = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(source.iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors", ".tiktoken")
    ]
    return hashlib.sha256("|".join([VERSION, str(source.resolve()), *parts]).encode()).hexdigest()[:12]


def convert(source: Path, out: Path) -> None:
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    qwen2 = qwen2_config(config)
    (out / "config.json").write_text(json.dumps(qwen2, indent=2))
    _convert_weights(source, out, config)
    _write_tokenizer(source, out, qwen2["max_position_embeddings"])
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [qwen2["eos_token_id"], *_stop_ids()[1:]], "do_sample": False}, indent=2)
    )


def qwen2_config(config: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels") or hidden // heads)
    if head_dim * heads != hidden:
        raise QwenConversionError(
            f"this Qwen-1 config has kv_channels {head_dim} × {heads} heads ≠ hidden size {hidden}: "
            "not a layout llmhost can convert"
        )
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise QwenConversionError("this Qwen-1 config rotates only part of each head (rotary_pct < 1)")
    theta = float(config.get("rotary_emb_base", 10000))
    dtype = "bfloat16" if config.get("bf16") else "float16" if config.get("fp16") else "float32"
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": int(config["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(config["intermediate_size"]) // 2,
        "num_hidden_layers": int(config["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(config.get("seq_length") or config.get("max_position_embeddings")),
        "rms_norm_eps": float(config.get("layer_norm_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": theta,
        },
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_START,
        "eos_token_id": SPECIAL_START + 2,  # <|im_end|>: a chat reply ends there
        "dtype": dtype,
        "torch_dtype": dtype,
    }


SPECIAL_START = 151643  # Qwen-1's first special token id (<|endoftext|>)


def _stop_ids() -> list[int]:
    """<|im_end|>, <|im_start|>, <|endoftext|>: a reply stops at any of them."""
    return [SPECIAL_START + 2, SPECIAL_START + 1, SPECIAL_START]


def _rename(name: str, tensor: Any) -> list[tuple[str, Any]]:
    """One Qwen-1 tensor → its Qwen2 tensor(s)."""
    if name == "transformer.wte.weight":
        return [("model.embed_tokens.weight", tensor)]
    if name == "transformer.ln_f.weight":
        return [("model.norm.weight", tensor)]
    if name == "lm_head.weight":
        return [(name, tensor)]
    parts = name.split(".")
    if parts[:2] != ["transformer", "h"]:
        raise QwenConversionError(f"unexpected tensor {name} in a Qwen-1 checkpoint")
    layer, rest = f"model.layers.{parts[2]}", ".".join(parts[3:])
    if rest.startswith("attn.c_attn."):
        kind = parts[-1]  # weight or bias: q, k, v stacked along the first dimension
        q, k, v = tensor.chunk(3, dim=0)
        return [
            (f"{layer}.self_attn.{p}_proj.{kind}", t.contiguous())
            for p, t in zip("qkv", (q, k, v), strict=True)
        ]
    simple = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "mlp.w2.weight": "mlp.gate_proj.weight",  # w1(x) * silu(w2(x)): w2 is the gate
        "mlp.w1.weight": "mlp.up_proj.weight",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    if rest not in simple:
        raise QwenConversionError(f"unexpected tensor {name} in a Qwen-1 checkpoint")
    return [(f"{layer}.{simple[rest]}", tensor)]


def _convert_weights(source: Path, out: Path, config: dict[str, Any]) -> None:
    """Shard by shard, so a 7B model converts within the memory one shard takes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmhost.store.weights import check_safetensors

    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise QwenConversionError(f"{source} holds no .safetensors weights")
    check_safetensors(*shards)
    index: dict[str, str] = {}
    total = 0
    for shard in shards:
        converted: dict[str, Any] = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                for new, tensor in _rename(name, f.get_tensor(name)):
                    converted[new] = tensor
                    total += tensor.numel() * tensor.element_size()
        save_file(converted, str(out / shard.name), metadata={"format": "pt"})
        index.update(dict.fromkeys(converted, shard.name))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )


def read_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: one `base64(token bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tokenizer(ranks: dict[bytes, int]) -> Any:
    """The `tokenizers` byte-level BPE equal to tiktoken over these ranks (merges ordered by the
    rank of the token they make), with Qwen-1's pattern, NFC and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[c] for c in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[(text(a), text(b)) for _, a, b in merges], ignore_merges=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    first = max(ranks.values()) + 1
    if first != SPECIAL_START:
        raise QwenConversionError(f"qwen.tiktoken has {first} tokens, Qwen-1's has {SPECIAL_START}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tokenizer


def _write_tokenizer(source: Path, out: Path, context: int) -> None:
    from transformers import PreTrainedTokenizerFast

    vocab_file = source / "qwen.tiktoken"
    if not vocab_file.is_file():
        raise QwenReadError(f"{source} has no qwen.tiktoken (Qwen-1's vocabulary)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(read_ranks(vocab_file)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=context,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out))
