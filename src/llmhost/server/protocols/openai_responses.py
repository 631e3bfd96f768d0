"""OpenAI Responses (`POST /v1/responses`), what Codex CLI and the Agents SDK speak: the body,
its `GenerationRequest`, and the reply as a `response` object or OpenAI's typed event stream
(each event with its `sequence_number`). Responses are kept in memory (bounded) so that
`previous_response_id` and `GET /v1/responses/{id}` work for the server's life.

Agents send fields llmhost has no use for (include, prompt_cache_key, service_tier): they are
accepted and ignored; what asks for something llmhost lacks (a hosted tool, an image) is a 400
that names it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmhost.engine.chunks import Chunk, Result, ToolCall
from llmhost.engine.params import make_params
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.server.protocols.base import Defaults, Lenient, Protocol, Reply, sse
from llmhost.server.protocols.openai_common import NAME_PATTERN, reasoning_values


class Part(BaseModel):
    """A content part (input_text, output_text, refusal; anything else is refused by name)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


ItemType = Literal["message", "function_call", "function_call_output", "reasoning"]


class Item(BaseModel):
    """One input item: a message, a call the model made, a call's output, or earlier reasoning."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"  # the SDK's EasyInputMessage has no type
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[Part] | None = None
    call_id: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, min_length=1, max_length=128)
    arguments: str | None = None
    output: str | list[Part] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Item:
        need = {
            "message": ("role", "content"),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
            "reasoning": (),
        }.get(self.type)
        if need is None:
            raise ValueError(
                f"an input item of type {self.type!r} is not taken here "
                "(message, function_call, function_call_output, reasoning)"
            )
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self


class FunctionTool(Lenient):
    type: str
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(Lenient):
    type: str
    name: str | None = None


class Format(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> Format:
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError('a "json_schema" format needs name and schema')
        return self


class TextConfig(Lenient):
    format: Format | None = None


class ReasoningConfig(Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[Item] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    # "auto": drop the oldest turns when the conversation does not fit (OpenAI's meaning)
    truncation: Literal["auto", "disabled"] | None = None


class ResponseStore:
    """The last `limit` stored responses, each with the conversation that continues from it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            self._kept[response["id"]] = (response, conversation)
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)  # the oldest goes

    def get(self, response_id: str, param: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with self._lock:
            found = self._kept.get(response_id)
        if found is None:
            raise ResponseNotFound(response_id, param)
        return found

    def delete(self, response_id: str) -> None:
        with self._lock:
            if self._kept.pop(response_id, None) is None:
                raise ResponseNotFound(response_id)


class ResponseNotFound(LlmhostError):
    status = 404
    kind = "invalid_request_error"
    code = "response_not_found"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(
            f"no stored response with id {response_id!r}: responses are kept in memory while the server "
            "runs (the last --responses-kept of those sent with store: true)"
        )
        self.param = param


def _text(parts: str | list[Part], where: str) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for i, part in enumerate(parts):
        if part.type in ("input_text", "output_text", "text", "refusal"):
            out.append(part.text or str((part.model_extra or {}).get("refusal", "")))
        elif part.type in ("input_image", "input_file", "input_audio"):
            raise InvalidRequestError(
                f"{where}[{i}] is a part of type {part.type!r}: this model reads text only; send input_text",
                f"{where}.{i}",
            )
        else:
            raise InvalidRequestError(f"{where}[{i}] has an unknown part type {part.type!r}", f"{where}.{i}")
    return "".join(out)


def to_messages(items: str | list[Item]) -> list[dict[str, Any]]:
    """The engine's messages (OpenAI chat-shaped, as templates take them): `developer` as
    `system`, function_call items as the assistant turn's tool_calls, outputs as tool messages;
    reasoning items are dropped (the model does not see its old reasoning)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content or "", f"input.{i}.content")})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function"}
            call["function"] = {"name": item.name, "arguments": item.arguments}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # calls join the turn that made them
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            output = _text(item.output or "", f"input.{i}.output")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return out


def _tool_values(body: ResponsesRequest) -> dict[str, Any]:
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice is set but the request has no tools", "tool_choice")
        return {}
    for i, tool in enumerate(body.tools):
        if tool.type != "function":
            raise InvalidRequestError(
                f"tools[{i}] is a tool of type {tool.type!r}, which llmhost does not run; "
                "send function tools (type, name, parameters) and run the rest in the client",
                f"tools.{i}.type",
            )
        if tool.name is None:
            raise InvalidRequestError(f"tools[{i}] needs a name", f"tools.{i}.name")
    names = [t.name for t in body.tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: two functions have the same name", "tools")
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.parameters or {"type": "object"},
            },
        }
        for t in body.tools
    ]
    values: dict[str, Any] = {"tools": tools, "parallel_tool_calls": body.parallel_tool_calls}
    if isinstance(choice, str):
        values["tool_choice"] = choice
    elif choice is not None:
        if choice.type != "function":
            raise InvalidRequestError(
                f"tool_choice of type {choice.type!r} is not supported; use auto, none, required "
                'or {"type": "function", "name": ...}',
                "tool_choice",
            )
        if choice.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.name!r}, which is not in tools ({', '.join(names)})",
                "tool_choice.name",
            )
        values.update(tool_choice="required", tool_name=choice.name)
    return values


def _json_schema(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    return (fmt.schema_ or {"type": "object"}) if fmt.type == "json_schema" else {"type": "object"}


class Responses(Protocol):
    path = "/v1/responses"
    body = ResponsesRequest

    def __init__(self, kept: int = 256) -> None:
        self.store = ResponseStore(kept)

    def request(self, body: ResponsesRequest, defaults: Defaults) -> GenerationRequest:
        values: dict[str, Any] = {**_tool_values(body), "json_schema": _json_schema(body)}
        if body.max_output_tokens is not None:
            values["max_new_tokens"] = body.max_output_tokens
        for name in ("temperature", "top_p"):
            if getattr(body, name) is not None:
                values[name] = getattr(body, name)
        effort = body.reasoning.effort if body.reasoning else None
        values.update(reasoning_values(effort, None, defaults.reasoning))
        previous = body.previous_response_id
        earlier = self.store.get(previous, "previous_response_id")[1] if previous else []
        messages = [*earlier, *to_messages(body.input)]
        if body.instructions:  # instructions apply to this response only (not carried over)
            messages.insert(0, {"role": "system", "content": body.instructions})
        params = make_params(truncate_history=body.truncation == "auto", **values)
        return GenerationRequest(messages, params, model=body.model)

    def reply(self, body: ResponsesRequest, request: GenerationRequest, model: str) -> ResponsesReply:
        conversation = list(request.messages[1:] if body.instructions else request.messages)
        return ResponsesReply(body, model, self.store if body.store else None, conversation)

    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id)[0]

    def delete(self, response_id: str) -> dict[str, Any]:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


@dataclass(frozen=True)
class PartKind:
    """How one kind of streamed text part is framed: its item, where the part sits in the item,
    and the names of its events (a message's output_text, reasoning as text or as summary)."""

    item: str
    field: str
    part: str
    index: str
    added: str
    delta: str
    done: str
    part_done: str


MESSAGE = PartKind(
    "message", "content", "output_text", "content_index", "response.content_part.added",
    "response.output_text.delta", "response.output_text.done", "response.content_part.done",
)  # fmt: skip
REASONING = PartKind(
    "reasoning", "content", "reasoning_text", "content_index", "response.content_part.added",
    "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
)  # fmt: skip
SUMMARY = PartKind(
    "reasoning", "summary", "summary_text", "summary_index", "response.reasoning_summary_part.added",
    "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
    "response.reasoning_summary_part.done",
)  # fmt: skip


def _part(kind: PartKind, text: str) -> dict[str, Any]:
    part = {"type": kind.part, "text": text}
    return {**part, "annotations": [], "logprobs": []} if kind is MESSAGE else part


def _item(kind: PartKind, item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """A message or reasoning item; `text` None: just opened (no part yet)."""
    parts = [] if text is None else [_part(kind, text)]
    if kind.item == "message":
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}
    other = "content" if kind.field == "summary" else "summary"
    return {"id": item_id, "type": "reasoning", "status": status, kind.field: parts, other: []}


def _new_id(kind: PartKind) -> str:
    return f"{'msg' if kind is MESSAGE else 'rs'}_{uuid.uuid4().hex}"


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
        "call_id": call.id, "name": call.name, "arguments": call.arguments,
    }  # fmt: skip


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }  # fmt: skip


class ResponsesReply(Reply):
    """OpenAI's event stream: one text part is open at a time (reasoning, then the message);
    each tool call is one function_call item, added and done at once with its arguments."""

    def __init__(
        self,
        body: ResponsesRequest,
        model: str,
        store: ResponseStore | None,
        conversation: list[dict[str, Any]],
    ) -> None:
        self.body, self.model, self.store, self.conversation = body, model, store, conversation
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        summary = body.reasoning is not None and body.reasoning.summary is not None
        self.reasoning_kind = SUMMARY if summary else REASONING
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # output items, finished or open
        self._open: PartKind | None = None
        self._text = ""  # the open part's text so far

    def _event(self, kind: str, **fields: Any) -> str:
        self._seq += 1
        return sse({"type": kind, **fields, "sequence_number": self._seq - 1}, kind)

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": self._items, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "previous_response_id": body.previous_response_id,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "reasoning": body.reasoning.model_dump() if body.reasoning else {"effort": None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel)
            else body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "truncation": body.truncation or "disabled", "usage": usage, "user": None,
        }  # fmt: skip

    # -- streamed ------------------------------------------------------------------------

    def _write(self, kind: PartKind, text: str) -> Iterator[str]:
        if self._open is not kind:
            yield from self._close("completed")
            self._items.append(_item(kind, _new_id(kind), None, "in_progress"))
            self._open, self._text = kind, ""
            where = self._where()
            yield self._event(
                "response.output_item.added", output_index=where["output_index"], item=self._items[-1]
            )
            yield self._event(kind.added, **where, part=_part(kind, ""))
        self._text += text
        extra = {"logprobs": []} if kind is MESSAGE else {}
        yield self._event(kind.delta, **self._where(), delta=text, **extra)

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        where = {"item_id": self._items[-1]["id"], "output_index": len(self._items) - 1}
        return {**where, self._open.index: 0}

    def _close(self, status: str) -> Iterator[str]:
        kind = self._open
        if kind is None:
            return
        where = self._where()
        extra = {"logprobs": []} if kind is MESSAGE else {}
        yield self._event(kind.done, **where, text=self._text, **extra)
        yield self._event(kind.part_done, **where, part=_part(kind, self._text))
        self._items[-1] = _item(kind, where["item_id"], self._text, status)
        yield self._event(
            "response.output_item.done", output_index=where["output_index"], item=self._items[-1]
        )
        self._open = None

    def events(self, chunk: Chunk) -> Iterator[str]:
        if self._seq == 0:
            yield self._event("response.created", response=self.response("in_progress"))
            yield self._event("response.in_progress", response=self.response("in_progress"))
        if chunk.reasoning:
            yield from self._write(self.reasoning_kind, chunk.reasoning)
        if chunk.text:
            yield from self._write(MESSAGE, chunk.text)
        for call in chunk.tool_calls:
            yield from self._close("completed")
            item, index = _call_item(call), len(self._items)
            self._items.append(item)
            where = {"item_id": item["id"], "output_index": index}
            yield self._event(
                "response.output_item.added", output_index=index, item={**item, "arguments": ""}
            )
            yield self._event("response.function_call_arguments.delta", **where, delta=call.arguments)
            yield self._event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
            )
            yield self._event("response.output_item.done", output_index=index, item=item)
        if chunk.finish_reason is not None:
            status = "incomplete" if chunk.finish_reason == "length" else "completed"
            if not self._items:  # an empty answer is still a message
                yield from self._write(MESSAGE, "")
            yield from self._close(status)
            final = self.response(
                status, _usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens)
            )
            self._keep(final)
            yield self._event(f"response.{status}", response=final)

    def end(self) -> Iterator[str]:
        return iter(())  # response.completed ends a Responses stream ([DONE] is chat's)

    def failed(self, error: dict[str, Any]) -> Iterator[str]:
        detail = error.get("error", {})
        yield self._event(
            "error", code=detail.get("code"), message=detail.get("message"), param=detail.get("param")
        )

    # -- whole ---------------------------------------------------------------------------

    def whole(self, result: Result) -> dict[str, Any]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        if result.reasoning:
            kind = self.reasoning_kind
            self._items.append(_item(kind, _new_id(kind), result.reasoning, status))
        if result.text or not result.tool_calls:
            self._items.append(_item(MESSAGE, _new_id(MESSAGE), result.text, status))
        self._items += [_call_item(c) for c in result.tool_calls]
        final = self.response(
            status, _usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        )
        self._keep(final)
        return final

    def _keep(self, final: dict[str, Any]) -> None:
        """Store the response with the conversation that continues from it (its text and calls
        as the assistant's turn; reasoning is not carried, as in chat)."""
        if self.store is None:
            return
        text = "".join(p["text"] for i in self._items if i["type"] == "message" for p in i["content"])
        calls = [
            {
                "id": i["call_id"],
                "type": "function",
                "function": {"name": i["name"], "arguments": i["arguments"]},
            }
            for i in self._items
            if i["type"] == "function_call"
        ]
        turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        self.store.put(final, [*self.conversation, turn])
