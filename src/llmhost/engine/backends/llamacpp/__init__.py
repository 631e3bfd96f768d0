"""`--engine llamacpp` (`pip install llmhost[llamacpp]`): a GGUF file run by llama-cpp-python on
the CPU, with llama.cpp's quantized kernels and none of the conversion to float32.

It plugs into the same scheduler as the transformers engine: llama.cpp evaluates tokens and
hands back logits; llmhost's own sampling, stop strings, UTF-8-safe detokenization, queue and
cancellation run on top, so both engines behave alike for every front end. Concurrent requests
are decoded together with llama.cpp's multi-sequence batching, one slot each, up to
--max-concurrency; the rest wait in the queue (llmhost_queue_length in /metrics). Each slot keeps
its last request's KV cache, so a conversation's next turn prefills only what is new.

- `engine.py`: the engine (loading, tokenizing, the chat template) and the KV cache's size;
- `runner.py`: the runner the scheduler drives (prefill, step, drop), over
- `slots.py`: one `Slot` per sequence, and the pure choices over them (reuse, placement);
- `kernels.py`: ggml's CPU kernel choice (reference kernels for exact prefix reuse);
- `repack.py`: whether llama.cpp repacks weights on this CPU (probed where AMX is advertised).
"""

from llmhost.engine.backends.llamacpp.engine import (
    DEFAULT_SLOT_TOKENS,
    INSTALL,
    LlamaCppEngine,
    available,
    kv_bytes_per_token,
    load,
    slot_tokens,
)
from llmhost.engine.backends.llamacpp.runner import PREFILL_CHUNK, LlamaCppRunner
from llmhost.hardware import physical_cores

__all__ = [
    "DEFAULT_SLOT_TOKENS",
    "INSTALL",
    "PREFILL_CHUNK",
    "LlamaCppEngine",
    "LlamaCppRunner",
    "available",
    "kv_bytes_per_token",
    "load",
    "physical_cores",
    "slot_tokens",
]
