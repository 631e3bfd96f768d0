"""The OpenAI protocol as pydantic models. Limits are declared on the fields; unknown fields are
refused (400), never silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image or audio part: understood, so that the answer can say the model reads text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "input_image"]


class ChatMessage(_Strict):
    # `developer` is OpenAI's newer name for `system` (the official SDK sends it for o-series)
    role: Literal["system", "developer", "user", "assistant"]
    # a string, or a list of parts as Open WebUI, LangChain and the SDK's typed messages send
    content: str | list[TextPart | MediaPart] = Field(union_mode="left_to_right")
    name: str | None = Field(None, max_length=256)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(
        description="Only plain text is produced so far; json_object / json_schema are refused (400)."
    )


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
    logprobs: Literal[False] | None = None
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
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    truncate_history: bool = Field(
        False,
        description="Extension: drop the oldest turns (never the system prompt or the last message) "
        "when the conversation does not fit the context window, instead of answering 400. "
        "The number dropped is reported as `llmhost.dropped_turns`.",
    )


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
