"""The Responses API's reply: a `response` object whole, or OpenAI's typed event stream (each
event with its `sequence_number`, `output_index` and `item_id`), and what a stored response
keeps for `previous_response_id`."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from llmhost.engine.chunks import Chunk, Result, ToolCall
from llmhost.errors import LlmhostError
from llmhost.server.protocols.base import Reply, sse
from llmhost.server.protocols.openai_responses_body import Function, ResponsesRequest, seen_as


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


def _call_item(call: ToolCall, functions: dict[str, Function]) -> dict[str, Any]:
    item = {
        "id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "completed",
        "call_id": call.id, "name": call.name, "arguments": call.arguments,
    }  # fmt: skip
    function = functions.get(call.name)
    if function is not None and function.namespace is not None:
        item.update(name=function.name, namespace=function.namespace)
    return item


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
            item, index = _call_item(call, self.body.functions), len(self._items)
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
        if result.text or not (result.tool_calls or result.reasoning):  # never no item at all
            self._items.append(_item(MESSAGE, _new_id(MESSAGE), result.text, status))
        self._items += [_call_item(c, self.body.functions) for c in result.tool_calls]
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
                "function": {"name": seen_as(i["name"], i.get("namespace")), "arguments": i["arguments"]},
            }
            for i in self._items
            if i["type"] == "function_call"
        ]
        turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        self.store.put(final, [*self.conversation, turn])
