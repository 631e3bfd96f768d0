"""The transformers engine's KV cache (`--kv-cache f16|q8_0`). q8_0 is llama.cpp's 8-bit type
done in torch: blocks of 32 values along the head dimension, each stored as int8 with one f16
scale (34 bytes per 32 values, as llama.cpp's; `estimate` counts it the same). Keys and values
are quantized as they enter the cache and read back whole for attention, a layer at a time.

A layer's int8 values and the bytes of their scales sit side by side in one tensor per head and
position, [B, H, T, D + D/16]: the runner's row and position work (left padding, merging rows,
dropping them, cutting positions, speculation's rollback) acts on dims 0 and 2 and is the same
for both cache types. transformers' own QuantizedCache does not fit that work: its quantized
states are kept apart from `keys` and `values`, per request (fp8 with one scale per tensor,
quanto's 2 and 4 bits, HQQ's optional package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.cache_utils import DynamicLayer

from llmhost.engine.backends.hf_folder import plain_cache
from llmhost.errors import LlmhostError

#: Values per scale (llama.cpp's QK8_0); a head dimension that is no multiple of it gets one
#: scale per head and position.
BLOCK = 32


def head_dim(config: Any) -> int:
    text = config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


class Q8Layer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` hold q8_0 (see the module's docstring); `update`
    stores the new positions and answers the whole layer in the model's dtype."""

    def __init__(self, dim: int, dtype: Any) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype
        self.block = BLOCK if dim % BLOCK == 0 else dim

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        if key_states.shape[-1] != self.dim or value_states.shape[-1] != self.dim:
            raise LlmhostError(
                f"--kv-cache q8_0 needs keys and values of the config's head size {self.dim}; this model's "
                f"are {key_states.shape[-1]} and {value_states.shape[-1]}: use --kv-cache f16"
            )
        super().lazy_initialization(key_states, value_states)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = torch.empty(0, dtype=torch.int8, device=self.device)
        self.keys = torch.cat([self.keys, self.pack(key_states)], dim=-2)
        self.values = torch.cat([self.values, self.pack(value_states)], dim=-2)
        return self.unpack(self.keys), self.unpack(self.values)

    def pack(self, x: Any) -> Any:
        import torch

        blocks = x.float().unflatten(-1, (-1, self.block))
        scale = (blocks.abs().amax(-1) / 127).to(torch.float16)  # as llama.cpp: the f16 scale divides
        inverse = torch.where(scale > 0, 1 / scale.float(), 0.0).unsqueeze(-1)
        q = (blocks * inverse).round().clamp(-127, 127).to(torch.int8).flatten(-2)
        return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)

    def unpack(self, packed: Any) -> Any:
        import torch

        scale = packed[..., self.dim :].contiguous().view(torch.float16).float().unsqueeze(-1)
        q = packed[..., : self.dim].unflatten(-1, (-1, self.block)).float()
        return (q * scale).flatten(-2).to(self.dtype)

    def take(self, keys: Any, values: Any) -> None:
        """Hold positions already packed (a kept prefix), as they are."""
        self.device, self.keys, self.values, self.is_initialized = keys.device, keys, values, True


def new_cache(model: Any, kv_cache: str) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if kv_cache == "q8_0":
        dim = head_dim(model.config)
        cache.layers = [Q8Layer(dim, model.dtype) for _ in cache.layers]
    return cache


def restore(cache: Any, layers: list[tuple[Any, Any]], n: int) -> None:
    """`cache` (new) holds the first `n` positions of kept `layers`, as views: a cache's update
    makes new tensors, so the kept ones are never written."""
    for i, (keys, values) in enumerate(layers):
        layer = cache.layers[i]
        if isinstance(layer, Q8Layer):
            layer.take(keys[:, :, :n], values[:, :, :n])
        else:
            cache.update(keys[:, :, :n], values[:, :, :n], i)


def check(folder: Path, kv_cache: str, remote: bool) -> None:
    """q8_0 rides on the runner's plain full-attention cache rows; the model's config says
    whether it has them, so a refusal comes before its weights load."""
    if kv_cache != "q8_0":
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=remote)
    if not plain_cache(config):
        raise LlmhostError(
            "--kv-cache q8_0 on the transformers engine needs a model whose layers all attend to "
            f"the whole sequence; {config.model_type} has sliding-window or recurrent layers: "
            "use --kv-cache f16, or a GGUF of it on llama.cpp"
        )
