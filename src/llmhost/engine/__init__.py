"""The generation engine: `load()` a model, then `stream_generate()` / `generate()` from it.

Nothing here imports a web or CLI framework; torch and transformers load lazily.
"""

from llmhost.engine.base import Engine, generate, stream_generate
from llmhost.engine.loader import load, resolve
from llmhost.engine.params import GenerationParams, make_params
from llmhost.engine.types import Chunk, Result, collect

__all__ = [
    "Chunk",
    "Engine",
    "GenerationParams",
    "Result",
    "collect",
    "generate",
    "load",
    "make_params",
    "resolve",
    "stream_generate",
]
