"""Pure functions between the OpenAI protocol and the engine: requests → params, chunks → objects."""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmhost.engine.chunks import Chunk, FinishReason, Result
from llmhost.engine.params import GenerationParams, make_params
from llmhost.errors import InvalidRequestError
from llmhost.server.protocol import ChatCompletionRequest, CompletionRequest, TextPart


def penalty_from_openai(presence: float | None, frequency: float | None) -> float | None:
    """OpenAI's additive penalties have no exact counterpart in HF-style multiplicative ones.

    Mapping: p = the larger of presence/frequency penalty in [-2, 2]; repetition_penalty
    = 1 + p/2 for p ≥ 0 (up to 2.0) and 1 / (1 + |p|/2) for p < 0 (down to 0.5).
    """
    values = [v for v in (presence, frequency) if v]
    if not values:
        return None
    p = max(values, key=abs)
    return 1 + p / 2 if p >= 0 else 1 / (1 + abs(p) / 2)


def to_params(req: ChatCompletionRequest | CompletionRequest) -> GenerationParams:
    # an API caller decides what to send, unless it asks for llmhost's truncation extension
    values: dict[str, Any] = {"truncate_history": getattr(req, "truncate_history", False)}
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    penalty = req.repetition_penalty or penalty_from_openai(req.presence_penalty, req.frequency_penalty)
    if penalty is not None:
        values["repetition_penalty"] = penalty
    return make_params(**values)


def to_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The engine's messages: text parts joined, `developer` as `system`; anything but text is a
    400 that says so (the models llmhost serves read text only)."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if not isinstance(content, str):
            media = [p.type for p in content if not isinstance(p, TextPart)]
            if media:
                raise InvalidRequestError(
                    f"messages[{i}].content has a part of type {media[0]!r}: this model reads text only; "
                    "send text parts",
                    f"messages.{i}.content",
                )
            content = "".join(p.text for p in content if isinstance(p, TextPart))
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


def to_prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise InvalidRequestError("prompt: send one prompt per request (a list of one string)", "prompt")
    return req.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ObjectBuilder:
    """Builds the response objects of one request (same id and created time throughout)."""

    def __init__(
        self, model: str, chat: bool, report_dropped: bool = False, include_usage: bool = False
    ) -> None:
        self.model = model
        self.chat = chat
        self.report_dropped = report_dropped
        # with stream_options.include_usage, OpenAI sends "usage": null on every chunk but the last
        self._usage: dict[str, Any] = {"usage": None} if include_usage else {}
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, chunk: Chunk, first: bool) -> dict[str, Any]:
        finish = openai_finish(chunk.finish_reason)
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            extension = self._extension(chunk.dropped_turns) if finish else {}
            return {**self._base("chat.completion.chunk"), "choices": [choice], **self._usage, **extension}
        choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], **self._usage}

    def _extension(self, dropped_turns: int) -> dict[str, Any]:
        """llmhost's own facts, only for callers that asked for them (the truncation extension)."""
        return {"llmhost": {"dropped_turns": dropped_turns}} if self.report_dropped else {}

    def usage_chunk(self, last: Chunk) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            **self._base(obj),
            "choices": [],
            "usage": usage(last.prompt_tokens, last.completion_tokens),
            **self._extension(last.dropped_turns),
        }

    def whole(self, result: Result) -> dict[str, Any]:
        finish = openai_finish(result.finish_reason)
        if self.chat:
            message = {"role": "assistant", "content": result.text}
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {
            **self._base(obj),
            "choices": [choice],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
            **self._extension(result.dropped_turns),
        }
