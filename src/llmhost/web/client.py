"""The page's one path to a model: the official `openai` client, streaming, with timings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from llmhost.engine.openai_stream import StreamReader


@dataclass(frozen=True)
class ChatRequest:
    """Everything the page sends for one reply; each sidebar control maps to one field."""

    model: str
    messages: list[dict[str, str]]
    system: str = ""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    truncate_history: bool = False
    """llmhost's extension: the server drops the oldest turns that do not fit (others: 400)."""

    def to_kwargs(self) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": system + self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.truncate_history:
            kwargs["extra_body"] = {"truncate_history": True}
        return kwargs


@dataclass
class ReplyStats:
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    dropped_turns: int = 0
    finish_reason: str | None = None
    stopped: bool = False
    """The user pressed Stop before the reply ended."""

    def to_meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0, False)}


@dataclass
class ReplyStream:
    """Iterate for text deltas; `stats` is complete once iteration ends. `close()` hangs up, which
    makes an llmhost server cancel the generation at once."""

    _stream: Any
    stats: ReplyStats = field(default_factory=ReplyStats)
    _start: float = field(default_factory=time.perf_counter)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(reasoning, answer) deltas: a thinking model's reasoning comes apart from the answer."""
        reader = StreamReader(self._start)
        for chunk in self._stream:
            text = reader.read(chunk)
            self.stats.dropped_turns = int(reader.extension.get("dropped_turns") or 0)
            self.stats.finish_reason = reader.finish_reason
            self.stats.prompt_tokens = reader.prompt_tokens
            # until usage arrives (never, if stopped): one piece ≈ one token
            self.stats.completion_tokens = (
                reader.tokens if reader.pieces or reader.usage_tokens is not None else None
            )
            self.stats.ttft_s = reader.ttft_s
            if text or reader.reasoning:
                yield reader.reasoning, text
        self.stats.tokens_per_s = reader.decode_tps()

    def close(self) -> None:
        self._stream.close()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    loaded: bool | None = None
    """llmhost's servers say whether the model is loaded now (others: None)."""

    @property
    def is_llmhost(self) -> bool:
        return self.owned_by == "llmhost"


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 600) -> None:
        self.base_url = base_url
        # the openai client insists on a key; servers without auth ignore it
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout
        )

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(m.id, getattr(m, "owned_by", "") or "", getattr(m, "loaded", None))
            for m in self._client.models.list()
        ]

    def stream(self, request: ChatRequest) -> ReplyStream:
        start = time.perf_counter()
        raw = self._client.chat.completions.create(**request.to_kwargs())
        return ReplyStream(raw, _start=start)
