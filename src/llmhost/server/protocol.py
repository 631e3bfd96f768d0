"""The OpenAI protocol as pydantic models. Limits are declared on the fields; unknown fields are
refused (400), never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llmhost.engine.params import MAX_TOP_LOGPROBS

#: OpenAI's rule for function names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image or audio part: understood, so that the answer can say the model reads text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "input_image"]


class CalledFunction(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCallIn(_Strict):
    """A call in an earlier assistant turn, sent back with the conversation."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = None  # some clients echo the streamed index back


class ChatMessage(_Strict):
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


class FunctionDefinition(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, up to 64 characters")
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only then')
        return self


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension: keep only the k most likely tokens.")
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Extension (HF style).")
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # fields whose values ask for nothing llmhost lacks: accepted, so that clients sending their
    # defaults work; values that would ask for more are refused by the types below
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true (as OpenAI answers)")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
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


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = Field(None, description="Extension: JSON output for a prompt.")
