"""Context policy: fit a conversation into the model's window by dropping the oldest turns."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmhost.errors import ContextOverflowError, InvalidRequestError

if TYPE_CHECKING:
    from llmhost.engine.params import GenerationParams

#: A chat message as OpenAI sends it: role, content (a string; None for an assistant turn that
#: only calls tools), and for tools `tool_calls` / `tool_call_id` / `name`.
Message = dict[str, Any]
ROLES = frozenset({"system", "user", "assistant", "tool"})


def validate_messages(messages: list[Message]) -> None:
    if not messages:
        raise InvalidRequestError("messages must hold at least one message", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        calls = m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise InvalidRequestError(
                f"messages[{i}] must have a string 'content' (null only for an assistant turn "
                "with tool_calls)",
                param="messages",
            )
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {m.get('role')!r}; use one of system, user, assistant, tool",
                param="messages",
            )
    if messages[-1]["role"] not in ("user", "tool"):
        raise InvalidRequestError(
            "the last message must come from the user (or be a tool's result)", param="messages"
        )


def request_messages(messages: list[Message] | None, params: GenerationParams) -> list[Message] | None:
    """The rules of a request's messages, for every engine: valid messages, the params' system
    prompt first unless the conversation has its own. None for a plain prompt."""
    if messages is None:
        return None
    validate_messages(messages)
    if params.system is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": params.system}, *messages]
    return messages


def fit_messages(
    messages: list[Message],
    encode: Callable[[list[Message]], list[int]],
    max_new_tokens: int,
    context_length: int,
    truncate: bool = True,
) -> tuple[list[Message], int, list[int]]:
    """Drop the oldest turns until prompt + max_new_tokens fits the window.

    Keeps a leading system message and the latest user turn. Returns the messages to send,
    the number of messages dropped, and the prompt's token ids (encoded once, not again).
    Raises ContextOverflowError when even system + latest user turn do not fit.
    """
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    dropped = 0
    while True:
        kept = head + body[dropped:]
        ids = encode(kept)
        n = len(ids)
        if n + max_new_tokens <= context_length:
            return kept, dropped, ids
        if len(body) - dropped <= 1 or not truncate:
            raise ContextOverflowError(n, max_new_tokens, context_length)
        dropped += 1
        # never start the kept history with an assistant reply (or a tool result) to a dropped question
        while dropped < len(body) - 1 and body[dropped]["role"] != "user":
            dropped += 1
