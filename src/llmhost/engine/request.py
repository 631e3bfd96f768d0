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
