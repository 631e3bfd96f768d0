"""Pure functions between the OpenAI protocol and the engine: requests → params, chunks → objects."""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmhost.engine.chunks import Chunk, FinishReason, Result, TokenLogprob, ToolCall
from llmhost.engine.params import GenerationParams, make_params
from llmhost.errors import InvalidRequestError
from llmhost.server.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, TextPart


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


def to_params(
    req: ChatCompletionRequest | CompletionRequest, reasoning: bool | None = None
) -> GenerationParams:
    """The engine's parameters for a request; `reasoning` is the server's default (--reasoning)."""
    # an API caller decides what to send, unless it asks for llmhost's truncation extension
    values: dict[str, Any] = {"truncate_history": getattr(req, "truncate_history", False)}
    values["json_schema"] = _json_schema(req.response_format)
    if isinstance(req, ChatCompletionRequest):
        values.update(_tool_values(req))
        values.update(_reasoning_values(req, reasoning))
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        values["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    else:
        values["logprobs"] = req.logprobs
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


def _json_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None
    return fmt.json_schema.schema_ or {"type": "object"}


def _tool_values(req: ChatCompletionRequest) -> dict[str, Any]:
    choice = req.tool_choice
    if choice is not None and not req.tools:
        raise InvalidRequestError("tool_choice is set but the request has no tools", "tool_choice")
    if not req.tools:
        return {}
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: two functions have the same name", "tools")
    values: dict[str, Any] = {"tools": tools, "parallel_tool_calls": req.parallel_tool_calls}
    if isinstance(choice, str):
        values["tool_choice"] = choice
    elif choice is not None:
        if choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                "tool_choice",
            )
        values.update(tool_choice="required", tool_name=choice.function.name)
    return values


def _reasoning_values(req: ChatCompletionRequest, default: bool | None) -> dict[str, Any]:
    """reasoning_effort "none" turns thinking off, any other effort on; the template also gets
    the effort itself (gpt-oss templates read it) and the request's chat_template_kwargs."""
    variables = dict(req.chat_template_kwargs or {})
    reasoning = default
    if req.reasoning_effort is not None:
        reasoning = req.reasoning_effort != "none"
        variables.setdefault("reasoning_effort", req.reasoning_effort)
    if "enable_thinking" in variables:
        reasoning = bool(variables.pop("enable_thinking"))
    return {"reasoning": reasoning, "template_kwargs": variables}


def to_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The engine's messages, OpenAI-shaped: text parts joined, `developer` as `system`, calls and
    tool results kept; anything but text is a 400 that says so (the models llmhost serves read
    text only)."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            media = [p.type for p in content if not isinstance(p, TextPart)]
            if media:
                raise InvalidRequestError(
                    f"messages[{i}].content has a part of type {media[0]!r}: this model reads text only; "
                    "send text parts",
                    f"messages.{i}.content",
                )
            content = "".join(p.text for p in content if isinstance(p, TextPart))
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(exclude={"index"}) for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
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
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_call_objects(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _top(entries: tuple[tuple[str, float, tuple[int, ...]], ...]) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in entries]


def chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    content = [
        {"token": i.token, "logprob": i.logprob, "bytes": list(i.bytes), "top_logprobs": _top(i.top)}
        for i in items
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0
) -> dict[str, Any]:
    offsets = []
    for i in items:
        offsets.append(offset)
        offset += len(i.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{t: lp for t, lp, _ in i.top} for i in items],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # OpenAI's field for prompt caching: tokens whose KV cache was reused
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ObjectBuilder:
    """Builds the response objects of one request (same id and created time throughout)."""

    def __init__(
        self,
        model: str,
        chat: bool,
        report_dropped: bool = False,
        include_usage: bool = False,
        logprobs: bool = False,
    ) -> None:
        self.model = model
        self.chat = chat
        self.report_dropped = report_dropped
        self.logprobs = logprobs
        # with stream_options.include_usage, OpenAI sends "usage": null on every chunk but the last
        self._usage: dict[str, Any] = {"usage": None} if include_usage else {}
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self._first = True
        self._calls = 0  # tool calls streamed so far: the next one's index
        self._offset = 0  # characters streamed so far (completions' text_offset)

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def events(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The stream objects for one engine chunk (none when it adds nothing): the text and
        reasoning delta, then each tool call as OpenAI streams it (a header with id, type and
        name, then the arguments), the finish reason on the last."""
        finish = openai_finish(chunk.finish_reason)
        if not self.chat:
            if not (chunk.text or finish or self._first or chunk.logprobs):
                return []
            self._first = False
            lp = completion_logprobs(chunk.logprobs, self._offset) if self.logprobs else None
            self._offset += len(chunk.text)
            choice = {"index": 0, "text": chunk.text, "logprobs": lp, "finish_reason": finish}
            return [{**self._base("text_completion"), "choices": [choice], **self._usage}]
        deltas: list[tuple[dict[str, Any], list[TokenLogprob]]] = []
        if chunk.text or chunk.reasoning or self._first or chunk.logprobs:
            delta: dict[str, Any] = {"role": "assistant"} if self._first else {}
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
            if chunk.text or not chunk.reasoning:
                delta["content"] = chunk.text
            deltas.append((delta, list(chunk.logprobs)))
        for call in chunk.tool_calls:
            header = {"index": self._calls, "id": call.id, "type": "function"}
            deltas.append(
                ({"tool_calls": [{**header, "function": {"name": call.name, "arguments": ""}}]}, [])
            )
            deltas.append(
                ({"tool_calls": [{"index": self._calls, "function": {"arguments": call.arguments}}]}, [])
            )
            self._calls += 1
        if finish and not deltas:
            deltas.append(({}, []))
        self._first = False
        objects = []
        for n, (delta, logprobs) in enumerate(deltas):
            last = n == len(deltas) - 1
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": chat_logprobs(logprobs) if self.logprobs and logprobs else None,
                "finish_reason": finish if last else None,
            }
            extension = self._extension(chunk.dropped_turns) if finish and last else {}
            objects.append(
                {**self._base("chat.completion.chunk"), "choices": [choice], **self._usage, **extension}
            )
        return objects

    def _extension(self, dropped_turns: int) -> dict[str, Any]:
        """llmhost's own facts, only for callers that asked for them (the truncation extension)."""
        return {"llmhost": {"dropped_turns": dropped_turns}} if self.report_dropped else {}

    def usage_chunk(self, last: Chunk) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            **self._base(obj),
            "choices": [],
            "usage": usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
            **self._extension(last.dropped_turns),
        }

    def whole(self, result: Result) -> dict[str, Any]:
        finish = openai_finish(result.finish_reason)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if result.reasoning:
                message["reasoning_content"] = result.reasoning
            if result.tool_calls:
                message["tool_calls"] = tool_call_objects(result.tool_calls)
                message["content"] = result.text or None
            logprobs = chat_logprobs(result.logprobs) if self.logprobs else None
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            logprobs = completion_logprobs(result.logprobs) if self.logprobs else None
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        return {
            **self._base(obj),
            "choices": [choice],
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            **self._extension(result.dropped_turns),
        }
