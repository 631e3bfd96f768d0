"""Typed values that cross the engine boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of an object, always whole."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability, with the most likely alternatives when asked."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One step of a streamed generation. The last chunk has `finish_reason` and the timings."""

    text: str
    """New answer text since the previous chunk (may be empty, never half a character)."""
    reasoning: str = ""
    """New reasoning text (a thinking model's `<think>` part), kept apart from the answer."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls completed in this step (each arrives whole, once)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """For the tokens of this step, when the request asked for them."""
    token_ids: tuple[int, ...] = ()
    """Token ids generated in this step."""
    prompt_tokens: int = 0
    """Tokens in the prompt as sent to the model (after any dropped turns)."""
    completion_tokens: int = 0
    """Tokens generated so far, this chunk's included."""
    finish_reason: FinishReason | None = None
    """Set on the last chunk only: `stop` (EOS or a stop string), `length`, `cancelled` or
    `tool_calls` (the reply ended with calls)."""
    ttft_s: float | None = None
    """Seconds from the call to the first generated token (last chunk only)."""
    decode_tps: float | None = None
    """Decode speed in tokens per second after the first token (last chunk only)."""
    dropped_turns: int = 0
    """Messages of the history left out so that the prompt fits the context window."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cache an earlier request left (prefix reuse), not evaluated again."""
    stop_sequence: str | None = None
    """The stop string that ended the reply (last chunk only; None for EOS or any other end)."""
    draft_tokens: int = 0
    """Tokens speculation proposed for this reply (last chunk only)."""
    accepted_tokens: int = 0
    """Of those, the tokens sampled as proposed: each saved a decode step (last chunk only)."""


@dataclass(slots=True)
class Result:
    """A whole generation: what `generate()` returns after collecting the stream."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    decode_tps: float | None
    dropped_turns: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_sequence: str | None = None
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "timings": {"ttft_s": self.ttft_s, "decode_tokens_per_s": self.decode_tps},
            "speculation": {"proposed": self.draft_tokens, "accepted": self.accepted_tokens},
            "dropped_turns": self.dropped_turns,
        }


@dataclass(frozen=True, slots=True)
class Embedded:
    """What an embedding model returns for a batch of inputs."""

    vectors: list[list[float]]
    """One per input, in input order."""
    prompt_tokens: int
    """Tokens read, special tokens included (after truncation)."""


@dataclass(frozen=True, slots=True)
class Scored:
    """What a reranker returns: one relevance score per document, in the documents' order."""

    scores: list[float]
    prompt_tokens: int
    """Tokens read over all (query, document) pairs."""


def decode_rate(tokens: int, first: float | None, last: float) -> float | None:
    """Decode tokens/s: the first token's time is the TTFT, the rate covers the tokens after it."""
    if first is None or tokens <= 1 or last <= first:
        return None
    return (tokens - 1) / (last - first)


def collect(chunks: object) -> Result:
    """Join a chunk stream into a Result: `generate()` is exactly this over `stream()`."""
    parts: list[str] = []
    thoughts: list[str] = []
    ids: list[int] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] = []
    last: Chunk | None = None
    for chunk in chunks:  # type: ignore[attr-defined]
        parts.append(chunk.text)
        thoughts.append(chunk.reasoning)
        ids.extend(chunk.token_ids)
        calls.extend(chunk.tool_calls)
        logprobs.extend(chunk.logprobs)
        last = chunk
    if last is None or last.finish_reason is None:
        raise RuntimeError("the engine's stream ended without a final chunk")
    return Result(
        text="".join(parts),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        ttft_s=last.ttft_s,
        decode_tps=last.decode_tps,
        dropped_turns=last.dropped_turns,
        cached_tokens=last.cached_tokens,
        token_ids=ids,
        reasoning="".join(thoughts),
        tool_calls=calls,
        logprobs=logprobs,
        stop_sequence=last.stop_sequence,
        draft_tokens=last.draft_tokens,
        accepted_tokens=last.accepted_tokens,
    )
