"""Reading a streamed OpenAI reply (chat or completions chunks from the official client): text
deltas, usage, finish reason, llmhost's extension, time to first token and decode rate.

The one reader for both callers of OpenAI-compatible servers: the openai/vLLM engine and the
web page's client.
"""

from __future__ import annotations

import time
from typing import Any

from llmhost.engine.chunks import TokenLogprob, ToolCall, decode_rate


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
        self.stop_sequence: str | None = None
        """The stop string that ended the reply, where the upstream says (vLLM's `stop_reason`)."""
        self.extension: dict[str, Any] = {}
        """llmhost's own `llmhost` field on chunks (dropped_turns, ...)."""
        self.reasoning = ""
        """The reasoning the last item added (`reasoning_content`, or vLLM's newer `reasoning`)."""
        self.logprobs: list[TokenLogprob] = []
        """The token logprobs the last item carried."""
        self._calls: dict[int, dict[str, str]] = {}  # tool calls being streamed, by index
        self._done_calls = 0

    def read(self, item: Any) -> str:
        """The text `item` adds ("" for none); reasoning, tool-call fragments, logprobs, usage,
        finish reason and extension are recorded."""
        self.reasoning = ""
        self.logprobs = []
        if (extension := (getattr(item, "model_extra", None) or {}).get("llmhost")) is not None:
            self.extension.update(extension)
        if (usage := getattr(item, "usage", None)) is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.usage_tokens = usage.completion_tokens
        text = ""
        for choice in item.choices or []:
            delta = getattr(choice, "delta", None)
            text += (delta.content if delta is not None else getattr(choice, "text", "")) or ""
            if delta is not None:
                extra = getattr(delta, "model_extra", None) or {}
                self.reasoning += extra.get("reasoning_content") or extra.get("reasoning") or ""
                for call in delta.tool_calls or []:
                    self._add_call(call)
            self.logprobs += _logprobs(getattr(choice, "logprobs", None))
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
                stop = (getattr(choice, "model_extra", None) or {}).get("stop_reason")
                self.stop_sequence = stop if isinstance(stop, str) else None  # an int is a token id
        if text or self.reasoning:
            if self.first is None:
                self.first = time.perf_counter()
            self.pieces += 1
        return text

    def _add_call(self, fragment: Any) -> None:
        call = self._calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = fragment.id or call["id"]
        function = fragment.function
        if function is not None:
            call["name"] += function.name or ""
            call["arguments"] += function.arguments or ""

    def completed_calls(self) -> list[ToolCall]:
        """Calls whose every fragment has arrived: all but the last until the reply finishes."""
        indexes = sorted(self._calls)
        done = indexes if self.finish_reason is not None else indexes[:-1]
        out = []
        for index in done[self._done_calls :]:
            c = self._calls[index]
            out.append(ToolCall(c["id"], c["name"], c["arguments"] or "{}"))
        self._done_calls += len(out)
        return out

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count once given, else the text pieces so far."""
        return self.usage_tokens if self.usage_tokens is not None else self.pieces

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    def decode_tps(self) -> float | None:
        return decode_rate(self.tokens, self.first, time.perf_counter())


def _logprobs(value: Any) -> list[TokenLogprob]:
    """A streamed choice's logprobs as llmhost's: chat's shape, or completions' legacy one."""
    if value is None:
        return []
    if getattr(value, "tokens", None) is not None:  # completions: parallel lists
        tops = value.top_logprobs or [{}] * len(value.tokens)
        return [
            TokenLogprob(
                t, lp, tuple(t.encode()), tuple((k, v, tuple(k.encode())) for k, v in (top or {}).items())
            )
            for t, lp, top in zip(value.tokens, value.token_logprobs, tops, strict=False)
        ]
    content = getattr(value, "content", None)
    out = []
    for entry in content or []:
        top = tuple((t.token, t.logprob, tuple(t.bytes or ())) for t in entry.top_logprobs or [])
        out.append(TokenLogprob(entry.token, entry.logprob, tuple(entry.bytes or ()), top))
    return out
