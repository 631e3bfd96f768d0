"""OpenAI Responses (`POST /v1/responses`), what Codex CLI and the Agents SDK speak: the body,
its `GenerationRequest`, and the reply as a `response` object or OpenAI's typed event stream
(each event with its `sequence_number`). Responses are kept in memory (bounded) so that
`previous_response_id` and `GET /v1/responses/{id}` work for the server's life.

Agents send fields llmhost has no use for (include, prompt_cache_key, service_tier): they are
accepted and ignored; what asks for something llmhost lacks (a hosted tool, an image) is a 400
that names it."""

from __future__ import annotations

from typing import Any

from llmhost.engine.params import make_params
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Defaults, Protocol
from llmhost.server.protocols.openai_common import reasoning_values
from llmhost.server.protocols.openai_responses_body import Item, Part, ResponsesRequest, seen_as
from llmhost.server.protocols.openai_responses_reply import ResponsesReply, ResponseStore


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
            name = seen_as(item.name or "", (item.model_extra or {}).get("namespace"))
            call = {"id": item.call_id, "type": "function"}
            call["function"] = {"name": name, "arguments": item.arguments}
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
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f.tool.description or "",
                "parameters": f.tool.parameters or {"type": "object"},
            },
        }
        for name, f in body.functions.items()
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
        name = seen_as(choice.name or "", (choice.model_extra or {}).get("namespace"))
        if name not in body.functions:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.name!r}, which is not in tools "
                f"({', '.join(body.functions)})",
                "tool_choice.name",
            )
        values.update(tool_choice="required", tool_name=name)
    return values


def _json_schema(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    return (fmt.schema_ or {"type": "object"}) if fmt.type == "json_schema" else {"type": "object"}


#: The ceiling of a reply that sets none (the window lowers it).
MAX_TOKENS = 131072


class Responses(Protocol):
    path = "/v1/responses"
    body = ResponsesRequest

    def __init__(self, kept: int = 256) -> None:
        self.store = ResponseStore(kept)

    def request(self, body: ResponsesRequest, defaults: Defaults) -> GenerationRequest:
        values: dict[str, Any] = {**_tool_values(body), "json_schema": _json_schema(body)}
        # no max_output_tokens (Codex sends none): as long as the window allows, as OpenAI does
        values["max_new_tokens"] = body.max_output_tokens or MAX_TOKENS
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
        params = make_params(truncate_history=body.truncation == "auto", fit_max_tokens=True, **values)
        return GenerationRequest(messages, params, model=body.model)

    def reply(self, body: ResponsesRequest, request: GenerationRequest, model: str) -> ResponsesReply:
        conversation = list(request.messages[1:] if body.instructions else request.messages)
        return ResponsesReply(body, model, self.store if body.store else None, conversation)

    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id)[0]

    def delete(self, response_id: str) -> dict[str, Any]:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}
