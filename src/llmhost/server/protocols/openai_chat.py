"""OpenAI chat completions (`POST /v1/chat/completions`): the body, its `GenerationRequest`, and
the reply as `chat.completion` / `chat.completion.chunk` objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmhost.engine.chunks import Chunk, Result, TokenLogprob, ToolCall
from llmhost.engine.params import MAX_TOP_LOGPROBS, make_params
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Defaults, Protocol
from llmhost.server.protocols.openai_common import (
    NAME_PATTERN,
    OpenAIReply,
    Sampling,
    Strict,
    openai_finish,
    reasoning_values,
    sampling_values,
)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image or audio part: understood, so that the answer can say the model reads text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "input_image"]


class CalledFunction(Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCallIn(Strict):
    """A call in an earlier assistant turn, sent back with the conversation."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = None  # some clients echo the streamed index back


class ChatMessage(Strict):
    # `developer` is OpenAI's newer name for `system` (the official SDK sends it for o-series)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string, or a list of parts as Open WebUI, LangChain and the SDK's typed messages send;
    # null only for an assistant turn that calls tools
    content: str | list[TextPart | MediaPart] | None = Field(None, union_mode="left_to_right")
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)
    # what some clients echo back from an earlier reply: accepted, not sent to the model
    reasoning_content: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        return self


class FunctionDefinition(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, up to 64 characters")
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension (vLLM's): variables for the chat template, e.g. enable_thinking."
    )
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    truncate_history: bool = Field(
        False,
        description="Extension: drop the oldest turns (never the system prompt or the last message) "
        "when the conversation does not fit the context window, instead of answering 400. "
        "The number dropped is reported as `llmhost.dropped_turns`.",
    )


class ChatCompletions(Protocol):
    path = "/v1/chat/completions"
    body = ChatCompletionRequest

    def request(self, body: ChatCompletionRequest, defaults: Defaults) -> GenerationRequest:
        # an API caller decides what to send, unless it asks for llmhost's truncation extension
        values = sampling_values(body, body.max_completion_tokens or body.max_tokens)
        values.update(
            _tool_values(body),
            **reasoning_values(body.reasoning_effort, body.chat_template_kwargs, defaults.reasoning),
        )
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        values["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
        params = make_params(truncate_history=body.truncate_history, **values)
        return GenerationRequest(to_messages(body), params, model=body.model)

    def reply(self, body: ChatCompletionRequest, request: GenerationRequest, model: str) -> ChatReply:
        return ChatReply(
            model, body.include_usage, body.truncate_history, request.params.logprobs is not None
        )


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


class ChatReply(OpenAIReply):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first = True
        self._calls = 0  # tool calls streamed so far: the next one's index

    def chunk_objects(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The text and reasoning delta, then each tool call as OpenAI streams it (a header with
        id, type and name, then the arguments), the finish reason on the last."""
        finish = openai_finish(chunk.finish_reason)
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
            objects.append(
                self._chunk(choice, self.extension(chunk.dropped_turns) if finish and last else None)
            )
        return objects

    def choice(self, result: Result) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = tool_call_objects(result.tool_calls)
            message["content"] = result.text or None
        return {
            "index": 0,
            "message": message,
            "logprobs": chat_logprobs(result.logprobs) if self.logprobs else None,
            "finish_reason": openai_finish(result.finish_reason),
        }
