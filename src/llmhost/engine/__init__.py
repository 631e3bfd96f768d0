"""The generation engine: `load()` a model, then `stream_generate()` / `generate()` from it.

Nothing here imports a web or CLI framework; torch and transformers load lazily.

The life of a request, file by file (a chat request to `llmhost serve` on a local engine):

1. The request's protocol (`server/protocols/`) maps its body to one `GenerationRequest`
   (`request.py`: messages or a prompt, `GenerationParams` from `params.py`, the model name,
   the cancel event). The server's pool (`server/pool.py`) leases the model's engine, loaded
   on demand by `load_ref()` in `loader.py` from a `ModelRef` (`ref.py`) on one of
   `backends/` (a LoRA adapter is its base's engine with the request marked for the adapter),
   and the server calls `Engine.astream(request)` (`base.py`).
2. `local.py` (`LocalEngine`): the request rules and the system prompt (`context.py`), the chat
   template with any tools (`template.py`, `tools.py`), tokenizing (the backend), fitting the
   window (`context.py`); it creates the request's `SequenceState` (`sequence.py`) with its
   reply parser (`reply.py`) and any grammar (`grammar.py`), and submits it.
3. `scheduler.py`: one inference thread owns the model; it admits the request, has the
   backend's `BatchRunner` prefill it (llama.cpp: in a slot, reusing its prompt cache), then
   steps it with every running request in one batch, each row with its own adapter, if any
   (transformers: `backends/lora.py`; llama.cpp: one decode call per adapter).
4. `sampling.py` picks each next token from the runner's logits, after the request's logits
   processors (a grammar's mask).
5. `sequence.py` turns the token into text (`text.py`: UTF-8-safe detokenizing, stop strings),
   splits it into reasoning, answer and tool calls (`reply.py`), and makes a typed `Chunk`
   (`chunks.py`), the last one with finish reason and timings.
6. The chunk travels back to the caller's iterator; the protocol renders it (an OpenAI
   chunk). The remote backends (vllm, openai) skip 2-5: their server does them, and
   `openai_stream.py` reads its chunks back.
"""

from llmhost.engine.base import Engine, generate, stream_generate
from llmhost.engine.chunks import Chunk, Result, collect
from llmhost.engine.loader import load
from llmhost.engine.params import GenerationParams, make_params
from llmhost.engine.ref import ModelRef, resolve_ref
from llmhost.engine.request import GenerationRequest

__all__ = [
    "Chunk",
    "Engine",
    "GenerationParams",
    "GenerationRequest",
    "ModelRef",
    "Result",
    "collect",
    "generate",
    "load",
    "make_params",
    "resolve_ref",
    "stream_generate",
]
