"""Reading a streamed OpenAI reply (chat or completions chunks from the official client): text
deltas, usage, finish reason, llmhost's extension, time to first token and decode rate.

The one reader for both callers of OpenAI-compatible servers: the openai/vLLM engine and the
web page's client.
"""

from __future__ import annotations

import time
from typing import Any

from llmhost.engine.chunks import decode_rate


class StreamReader:
    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.first: float | None = None
        """When the first text arrived."""
        self.pieces = 0
        """Chunks that carried text (≈ tokens, until the server's usage says exactly)."""
        self.prompt_tokens: int | None = None
        self.usage_tokens: int | None = None
        """completion_tokens from the usage chunk, once it arrived."""
        self.finish_reason: str | None = None
        self.extension: dict[str, Any] = {}
        """llmhost's own `llmhost` field on chunks (dropped_turns, ...)."""

    def read(self, item: Any) -> str:
        """The text `item` adds ("" for none); usage, finish reason and extension are recorded."""
        if (extension := (getattr(item, "model_extra", None) or {}).get("llmhost")) is not None:
            self.extension.update(extension)
        if (usage := getattr(item, "usage", None)) is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.usage_tokens = usage.completion_tokens
        text = ""
        for choice in item.choices or []:
            delta = getattr(choice, "delta", None)
            text += (delta.content if delta is not None else getattr(choice, "text", "")) or ""
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        if text:
            if self.first is None:
                self.first = time.perf_counter()
            self.pieces += 1
        return text

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count once given, else the text pieces so far."""
        return self.usage_tokens if self.usage_tokens is not None else self.pieces

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    def decode_tps(self) -> float | None:
        return decode_rate(self.tokens, self.first, time.perf_counter())
