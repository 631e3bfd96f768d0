"""What a wire protocol is to the server: a body model, a mapping to one `GenerationRequest`,
and a renderer of the reply's chunks back to the wire shape. Routes only dispatch to these."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from llmhost.engine.chunks import Chunk, Result
from llmhost.engine.request import GenerationRequest

log = logging.getLogger("llmhost.server")


class Lenient(BaseModel):
    """A body part whose unknown fields are accepted and ignored, as Anthropic's and OpenAI's own
    APIs do for agents' newer fields (Claude Code and Codex send many); each unknown field is
    logged once, at debug level."""

    model_config = ConfigDict(extra="allow")
    _seen: ClassVar[set[str]] = set()

    @model_validator(mode="after")
    def _note_unknown(self) -> Lenient:
        for name in self.model_extra or {}:
            key = f"{type(self).__name__}.{name}"
            if key not in Lenient._seen:
                Lenient._seen.add(key)
                log.debug("ignoring the field %s, which llmhost does not use", key)
        return self


@dataclass(frozen=True)
class Defaults:
    """The server's settings a request falls back on where it does not say."""

    #: Whether thinking models think (--reasoning); None: each model's own default.
    reasoning: bool | None = None


class Reply(ABC):
    """Renders one reply in a protocol's shape: streamed (server-sent events) or whole."""

    @abstractmethod
    def events(self, chunk: Chunk) -> Iterator[str]:
        """The SSE frames for one engine chunk (none when it adds nothing)."""

    @abstractmethod
    def end(self) -> Iterator[str]:
        """The frames that close a stream (OpenAI's `data: [DONE]`)."""

    @abstractmethod
    def whole(self, result: Result) -> dict[str, Any]:
        """The reply as one JSON object (a request without `stream`)."""

    def failed(self, error: dict[str, Any]) -> Iterator[str]:
        """An error after the headers were sent: reported in-band, then the stream ends."""
        yield f"event: error\ndata: {json.dumps(error)}\n\n"


class Protocol(ABC):
    """One wire protocol, served at `path`: its body, parsed and limited by `body`'s fields."""

    path: ClassVar[str]
    body: ClassVar[type[BaseModel]]

    @abstractmethod
    def request(self, body: Any, defaults: Defaults) -> GenerationRequest:
        """The one request value for a validated body (a 400 raises InvalidRequestError)."""

    @abstractmethod
    def reply(self, body: Any, request: GenerationRequest, model: str) -> Reply:
        """The renderer for this request's reply, as model `model` (the served name)."""

    def streams(self, body: Any) -> bool:
        return bool(getattr(body, "stream", False))

    @classmethod
    def error_body(
        cls, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> dict[str, Any]:
        """An error in this protocol's shape (OpenAI's unless a protocol says otherwise)."""
        return openai_error(message, kind, param, code)


def openai_error(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(obj: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"
