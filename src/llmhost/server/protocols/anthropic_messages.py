"""Anthropic Messages (`POST /v1/messages`), what Claude Code speaks: the body, its
`GenerationRequest`, and the reply as a `message` object or Anthropic's event stream
(message_start, content blocks with their deltas, message_delta, message_stop).

Agents send many fields llmhost has no use for (cache_control, metadata, context_management,
output_config): the body accepts unknown fields and ignores them, as Anthropic's own API does
for fields it does not know; what would ask for something llmhost lacks (an image, a server
tool) is a 400 that names it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmhost.engine.chunks import Chunk, FinishReason, Result, ToolCall
from llmhost.engine.params import make_params
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Defaults, Lenient, Protocol, Reply, sse


class Block(BaseModel):
    """One content block; its fields depend on `type` (read in `_blocks`)."""

    model_config = ConfigDict(extra="allow")
    type: str


class MessageIn(Lenient):
    # Claude Code puts a {"role": "system"} entry inside messages too
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolIn(Lenient):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search_…) are refused


class ToolChoiceIn(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingIn(Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class MessagesRequest(Lenient):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=131072)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None


class CountTokensRequest(MessagesRequest):
    """count_tokens takes a Messages body without max_tokens."""

    max_tokens: int = Field(1, ge=1, le=131072)


def _text(blocks: list[Block], where: str) -> str:
    """The text of text blocks; any other kind is a 400 naming it (thinking blocks from earlier
    turns are dropped: the model does not see its old reasoning)."""
    parts = []
    for i, block in enumerate(blocks):
        if block.type == "text":
            parts.append(str(getattr(block, "text", "")))
        elif block.type in ("thinking", "redacted_thinking"):
            continue
        elif block.type in ("image", "document"):
            raise InvalidRequestError(
                f"{where}[{i}] is a block of type {block.type!r}: this model reads text only; send text",
                f"{where}.{i}",
            )
        else:
            raise InvalidRequestError(
                f"{where}[{i}] has an unknown block type {block.type!r}", f"{where}.{i}"
            )
    return "".join(parts)


def to_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The engine's messages (OpenAI-shaped, as the chat templates take them): tool_use blocks
    become an assistant turn's tool_calls, tool_result blocks tool messages."""
    out: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _text(req.system, "system")
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls = [], []
        for j, block in enumerate(m.content):
            extra = block.model_extra or {}
            if block.type == "tool_use" and m.role == "assistant":
                missing = [k for k in ("id", "name") if not extra.get(k)]
                if missing:
                    raise InvalidRequestError(
                        f"{where}[{j}] is a tool_use block without {' and '.join(missing)}", f"{where}.{j}"
                    )
                arguments = json.dumps(extra.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": extra.get("id"),
                        "type": "function",
                        "function": {"name": extra.get("name"), "arguments": arguments},
                    }
                )
            elif block.type == "tool_result" and m.role == "user":
                if not extra.get("tool_use_id"):
                    raise InvalidRequestError(
                        f"{where}[{j}] is a tool_result block without tool_use_id", f"{where}.{j}"
                    )
                content = extra.get("content") or ""
                if isinstance(content, list):
                    content = _text([Block.model_validate(b) for b in content], f"{where}.{j}.content")
                out.append(
                    {"role": "tool", "tool_call_id": extra.get("tool_use_id"), "content": str(content)}
                )
            else:
                text.append(_text([block], where))
        if calls:
            out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
        elif text or m.role != "user":
            out.append({"role": m.role, "content": "".join(text)})
    return out


def _tool_values(req: MessagesRequest) -> dict[str, Any]:
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice.type != "none":
            raise InvalidRequestError("tool_choice is set but the request has no tools", "tool_choice")
        return {}
    for i, tool in enumerate(req.tools):
        if tool.type not in (None, "custom"):
            raise InvalidRequestError(
                f"tools[{i}] is a server tool of type {tool.type!r}, which llmhost does not run; "
                "send client tools (name, description, input_schema)",
                f"tools.{i}.type",
            )
    names = [t.name for t in req.tools]
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema or {"type": "object"},
            },
        }
        for t in req.tools
    ]
    values: dict[str, Any] = {"tools": tools}
    if choice is None:
        return values
    if choice.disable_parallel_tool_use:
        values["parallel_tool_calls"] = False
    if choice.type == "tool":
        if choice.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the tool {choice.name!r}, which is not in tools ({', '.join(names)})",
                "tool_choice.name",
            )
        values.update(tool_choice="required", tool_name=choice.name)
    else:
        values["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return values


class Messages(Protocol):
    path = "/v1/messages"
    body = MessagesRequest

    def request(self, body: MessagesRequest, defaults: Defaults) -> GenerationRequest:
        values: dict[str, Any] = {"max_new_tokens": body.max_tokens, **_tool_values(body)}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(body, name) is not None:
                values[name] = getattr(body, name)
        if body.stop_sequences:
            values["stop"] = body.stop_sequences
        reasoning = defaults.reasoning
        if body.thinking is not None and body.thinking.type != "adaptive":
            reasoning = body.thinking.type == "enabled"
        # max_tokens is a ceiling (Claude Code asks for 32000): the window's end ends a reply too
        params = make_params(truncate_history=False, fit_max_tokens=True, reasoning=reasoning, **values)
        return GenerationRequest(to_messages(body), params, model=body.model)

    def reply(self, body: MessagesRequest, request: GenerationRequest, model: str) -> MessagesReply:
        return MessagesReply(model)

    @classmethod
    def error_body(
        cls, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> dict[str, Any]:
        if code == "context_length_exceeded":  # the words Claude Code looks for before compacting
            message = f"prompt is too long: {message}"
        return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


#: Anthropic's error types by HTTP status (its clients read the type, and retry on 429 and 529).
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


def stop_reason(reason: FinishReason | None, stop_sequence: str | None) -> str | None:
    if reason is None:
        return None
    if stop_sequence is not None:
        return "stop_sequence"
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(reason, "end_turn")


def _tool_use(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


class MessagesReply(Reply):
    """Anthropic's event stream: one block is open at a time (thinking, then text, then each
    tool_use); a block opens with its first content and closes when another kind starts."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex}"
        self._started = False
        self._open: str | None = None  # the kind of the open block
        self._index = -1

    def _message(
        self, content: list[dict[str, Any]], reason: str | None, usage: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
            "stop_reason": reason, "stop_sequence": None, "usage": usage,
        }  # fmt: skip

    def _open_block(self, kind: str, block: dict[str, Any]) -> Iterator[str]:
        yield from self._close_block()
        self._index += 1
        self._open = kind
        yield sse(
            {"type": "content_block_start", "index": self._index, "content_block": block},
            "content_block_start",
        )

    def _close_block(self) -> Iterator[str]:
        if self._open is not None:
            yield sse({"type": "content_block_stop", "index": self._index}, "content_block_stop")
            self._open = None

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse(
            {"type": "content_block_delta", "index": self._index, "delta": delta}, "content_block_delta"
        )

    def events(self, chunk: Chunk) -> Iterator[str]:
        if not self._started:
            self._started = True
            usage = {"input_tokens": chunk.prompt_tokens, "output_tokens": 0}
            yield sse({"type": "message_start", "message": self._message([], None, usage)}, "message_start")
            yield sse({"type": "ping"}, "ping")
        if chunk.reasoning:
            if self._open != "thinking":
                yield from self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": chunk.reasoning})
        if chunk.text:
            if self._open != "text":
                yield from self._open_block("text", {"type": "text", "text": ""})
            yield self._delta({"type": "text_delta", "text": chunk.text})
        for call in chunk.tool_calls:
            block = {**_tool_use(call), "input": {}}
            yield from self._open_block("tool_use", block)
            yield self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        if chunk.finish_reason is not None:
            yield from self._close_block()
            reason = stop_reason(chunk.finish_reason, chunk.stop_sequence)
            delta = {"stop_reason": reason, "stop_sequence": chunk.stop_sequence}
            usage = {"output_tokens": chunk.completion_tokens}
            yield sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")

    def end(self) -> Iterator[str]:
        return iter(())  # message_stop ended the stream already

    def whole(self, result: Result) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if result.reasoning:
            content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
        if result.text or not (result.reasoning or result.tool_calls):
            content.append({"type": "text", "text": result.text})
        content += [_tool_use(c) for c in result.tool_calls]
        usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens}
        message = self._message(content, stop_reason(result.finish_reason, result.stop_sequence), usage)
        return {**message, "stop_sequence": result.stop_sequence}

    def failed(self, error: dict[str, Any]) -> Iterator[str]:
        yield sse(error, "error")  # already in Anthropic's shape (the app shapes errors by path)
