"""The engine interface every front end talks to; front ends never ask which engine runs."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from llmhost.engine.chunks import Chunk, Embedded, Result, Scored, collect
from llmhost.engine.request import EmbedRequest, GenerationRequest, RerankRequest
from llmhost.engine.speculation import Mode
from llmhost.errors import InvalidRequestError, LlmhostError, NotSupportedError

#: How an error names what a model of each task is.
_TASKS = {"chat": "a chat model", "embed": "an embedding model", "rerank": "a reranker"}


class Engine(ABC):
    """A loaded model. `stream()` validates eagerly (errors raise at the call, before any chunk)
    and returns the chunk iterator; `generate()` merely collects it."""

    #: Name the model is known by (store name, folder name or the embedded default's name).
    name: str
    #: Which engine runs it: transformers, llamacpp, vllm or openai.
    kind: str
    #: Tokens the prompt plus the reply may span.
    context_length: int
    #: Where the model runs, in words (`ps`, /api/ps): cpu, cuda:0, mps, metal, "cuda (20/28
    #: layers) + cpu" for a llama.cpp model split between them, upstream.
    placement = "cpu"
    #: The KV cache's element type: f16, or llama.cpp's quantized q8_0 / q4_0 (--kv-cache).
    kv_cache = "f16"
    #: Prompt-lookup speculation by default (--speculative; llama.cpp's): auto, ngram or off.
    speculative: Mode = "off"

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Stream the reply to `request`. Setting `request.cancel` ends the stream within a token
        with finish_reason "cancelled"; closing the iterator stops the work too."""

    def generate(self, request: GenerationRequest) -> Result:
        return collect(self.stream(request))

    @abstractmethod
    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """`stream()` for asyncio: validation errors raise here; chunks never block the loop."""

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return 0

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return 0

    @property
    def problem(self) -> str | None:
        """Why the engine cannot serve now (a dead child process, say); None when it can."""
        return None

    #: Whether `add_adapter` serves LoRA adapters on this loaded model, chosen per request.
    serves_adapters = False

    def add_adapter(self, name: str, path: Path) -> Engine:
        """Serve the LoRA adapter in `path` as model `name` on this loaded model (its requests
        decode alongside the base's); the returned engine answers under that name."""
        raise LlmhostError(f"the {self.kind} engine does not serve LoRA adapters per request")

    def facts(self) -> dict[str, str]:
        """What `llmhost ps` and /api/ps show of a loaded model besides its name and engine."""
        return {
            "task": self.task,
            "device": self.placement,
            "kv_cache": self.kv_cache,
            "speculative": self.speculative,
        }

    #: What the model does: `chat` (replies), `embed` (vectors, /v1/embeddings) or `rerank`
    #: (relevance scores, /v1/rerank).
    task = "chat"

    def embed(self, request: EmbedRequest) -> Embedded:
        """Vectors for texts or token-id lists; only embedding models make them."""
        raise InvalidRequestError(
            f"{self.name} is {_TASKS[self.task]}: it makes no embeddings; name an embedding model "
            "(a sentence-transformers folder such as all-MiniLM-L6-v2 or bge-small-zh-v1.5)",
            "model",
        )

    async def aembed(self, request: EmbedRequest) -> Embedded:
        return await asyncio.to_thread(self.embed, request)

    def rerank(self, request: RerankRequest) -> Scored:
        """Relevance scores of documents for a query; only rerankers make them."""
        raise InvalidRequestError(
            f"{self.name} is {_TASKS[self.task]}: it does not rerank; name a reranker (a "
            "cross-encoder such as bge-reranker-v2-m3, or Qwen3-Reranker)",
            "model",
        )

    async def arerank(self, request: RerankRequest) -> Scored:
        return await asyncio.to_thread(self.rerank, request)

    def not_chat(self) -> InvalidRequestError:
        """The 400 an embedding model or a reranker answers a chat or completion request with."""
        endpoint = {"embed": "POST /v1/embeddings", "rerank": "POST /v1/rerank"}.get(self.task, "")
        return InvalidRequestError(
            f"{self.name} is {_TASKS[self.task]}: it answers {endpoint}, not chat or completions; ask a "
            "chat model for replies",
            "model",
        )

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's length in tokens, as this engine would send `request` to the model."""
        raise NotSupportedError(f"the {self.kind} engine cannot count tokens (local engines and vLLM can)")

    def close(self) -> None:  # noqa: B027 - optional hook; engines holding threads override it
        """Stop background work and release the model."""


def stream_generate(model: Engine, request: GenerationRequest) -> Iterator[Chunk]:
    """The one generator of the project (mlx-lm's name for it): chunks of a reply."""
    return model.stream(request)


def generate(model: Engine, request: GenerationRequest) -> Result:
    return model.generate(request)
