"""The engine interface every front end talks to; front ends never ask which engine runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from llmhost.engine.chunks import Chunk, Embedded, Result, collect
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError, LlmhostError, NotSupportedError


class Engine(ABC):
    """A loaded model. `stream()` validates eagerly (errors raise at the call, before any chunk)
    and returns the chunk iterator; `generate()` merely collects it."""

    #: Name the model is known by (store name, folder name or the embedded default's name).
    name: str
    #: Which engine runs it: transformers, llamacpp, vllm or openai.
    kind: str
    #: Tokens the prompt plus the reply may span.
    context_length: int

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

    #: What the model does: `chat` (replies) or `embed` (vectors, /v1/embeddings).
    task = "chat"

    def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None = None) -> Embedded:
        """Vectors for texts or token-id lists; only embedding models make them."""
        raise InvalidRequestError(
            f"{self.name} is a chat model: it makes no embeddings; serve an embedding model (a "
            "sentence-transformers folder such as all-MiniLM-L6-v2) and name it",
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
