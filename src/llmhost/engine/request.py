"""`GenerationRequest`: one request for one reply, the value every front end builds once.

A protocol (server/protocols/), the terminal chat and `llmhost generate` each turn what they
were given into this value; it then travels whole through the pool, the engine, the scheduler
and the runner. The sampling, stopping and output-shape fields are `GenerationParams`
(params.py), declared once there; this value adds what the reply is for and how it ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from llmhost.engine.context import Message
from llmhost.engine.params import GenerationParams
from llmhost.errors import InvalidRequestError


@dataclass(frozen=True)
class GenerationRequest:
    """A chat reply to `messages`, or a plain continuation of `prompt` (exactly one of them)."""

    messages: list[Message] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    prompt: str | None = None
    #: The model the caller named (the pool resolves it); None where only one model is loaded.
    model: str | None = None
    #: Set it (the caller hung up, Ctrl-C) and the reply ends within a token, finish "cancelled".
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequestError("give either messages or a prompt")

    @property
    def chat(self) -> bool:
        """A chat reply (the template, tools and reasoning apply), not a plain continuation."""
        return self.messages is not None


@dataclass(frozen=True)
class EmbedRequest:
    """Vectors for texts, or for lists of the model's own token ids (without special tokens)."""

    inputs: list[str] | list[list[int]]
    model: str | None = None
    #: Keep the first `dimensions` values (Matryoshka models only), renormalised.
    dimensions: int | None = None
    #: Which of the model's prompts goes before each text ("query", "document"); None: its default.
    prompt: str | None = None
    #: A model without that prompt embeds the text bare (a client's input_type hint), not a 400.
    prompt_optional: bool = False
    #: Inputs past the model's limit are cut to it (sentence-transformers' way); off, a 400.
    truncate: bool = True


@dataclass(frozen=True)
class RerankRequest:
    """How relevant each document is to the query, one score per document in their order."""

    query: str
    documents: list[str]
    model: str | None = None
    #: The task description for rerankers that take one (Qwen3-Reranker); None: the model's default.
    instruction: str | None = None
