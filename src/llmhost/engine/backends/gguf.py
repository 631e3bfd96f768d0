"""GGUF → Hugging Face folder, converted once and cached.

Loading a GGUF through transformers converts the tokenizer and dequantizes every tensor (≈17 s
for the embedded model); the saved folder loads in ≈2 s. The cache is written to a temporary
folder and renamed into place, so an interrupted conversion never leaves a folder that loads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmhost.engine.cached import build_once
from llmhost.errors import LlmhostError


class GGUFReadError(LlmhostError):
    """The file could not be read as a GGUF model (its reference says how to mend it)."""


def check_readable(gguf: Path) -> None:
    """Raise GGUFReadError unless the header and every tensor's data are in the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:
        raise GGUFReadError(f"{type(err).__name__}: {err}".splitlines()[0]) from None
    size = gguf.stat().st_size
    if end > size:
        raise GGUFReadError(f"its tensors need {end} bytes, the file has {size}")


def cache_key(gguf: Path, version: str | None = None) -> str:
    """Identity of a GGUF file: package version + size when embedded, else path + size + mtime."""
    st = gguf.stat()
    ident = f"{version}:{st.st_size}" if version else f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def converted_folder(gguf: Path, cache_root: Path, key: str) -> Path:
    """The HF folder for `gguf` under `cache_root`, converting it first if needed."""
    target = cache_root / f"{gguf.stem}-{key}"
    return build_once(target, lambda out: _convert(gguf, out), gguf, GGUFReadError)


def _convert(gguf: Path, out: Path) -> None:
    import functools

    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(gguf_utils.tqdm, functools.partial):  # its progress bar is noise to a user
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # float32 keeps the dequantized weights exact; load() casts to the dtype it runs in.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer refuses to serialize; the weights are already dense float32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# -- LoRA adapters for llama.cpp -----------------------------------------------------------------

#: peft's module names → llama.cpp's tensor names (blk.N.<name>.weight).
LORA_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: Architectures whose GGUF conversion reorders the query and key rows for its rotary layout
#: (convert_hf_to_gguf's `permute`): an adapter's B matrices of q and k are reordered the same way.
PERMUTED_QK = frozenset({"llama"})
LORA_ARCHS = frozenset({"llama", "qwen2", "qwen3"})


def lora_gguf(adapter: Path, cache_root: Path, arch: str, heads: int, kv_heads: int) -> Path:
    """A peft LoRA adapter as the GGUF adapter llama.cpp loads, converted once (cached by content)."""
    weights = adapter / "adapter_model.safetensors"
    try:
        digest = hashlib.sha256(weights.read_bytes() + (adapter / "adapter_config.json").read_bytes())
    except OSError as err:
        raise GGUFReadError(f"cannot read the adapter in {adapter}: {err.strerror}") from None
    target = cache_root / f"lora-{arch}-{digest.hexdigest()[:16]}"
    folder = build_once(
        target,
        lambda out: _convert_lora(adapter, out / "adapter.gguf", arch, heads, kv_heads),
        adapter,
        GGUFReadError,
        keep=(GGUFReadError,),
    )
    return folder / "adapter.gguf"


def _convert_lora(adapter: Path, out: Path, arch: str, heads: int, kv_heads: int) -> None:
    import json
    import re

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from llmhost.store.weights import check_safetensors

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if arch not in LORA_ARCHS:
        raise GGUFReadError(
            f"llama.cpp adapters for {arch} models are not converted here: use --engine transformers"
        )
    if config.get("use_rslora") or config.get("use_dora"):
        raise GGUFReadError("rsLoRA and DoRA adapters have no llama.cpp form: use --engine transformers")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config.get("lora_alpha", config.get("r", 8))))
    pattern = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")
    weights = adapter / "adapter_model.safetensors"
    check_safetensors(weights)
    for name, tensor in sorted(load_file(str(weights)).items()):
        m = pattern.search(name)
        if not m or m.group(2) not in LORA_TENSORS:
            raise GGUFReadError(
                f"the adapter changes {name}, which llama.cpp adapters cannot: use --engine transformers"
            )
        layer, module, part = int(m.group(1)), m.group(2), m.group(3)
        data = tensor.astype(np.float32)
        if part == "B" and arch in PERMUTED_QK and module in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if module == "self_attn.q_proj" else kv_heads
            rows = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:])
            data = rows.swapaxes(1, 2).reshape(data.shape)
        # llama.cpp reads lora_a as [rank, in] and lora_b as [out, rank]: peft's own layout
        target = f"blk.{layer}.{LORA_TENSORS[module]}.weight.lora_{part.lower()}"
        writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
