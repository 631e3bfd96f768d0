"""What OpenAI's chat and completions protocols share: the sampling fields and their mapping,
ids, finish reasons, usage, and the skeleton of a streamed reply."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llmhost.engine.chunks import Chunk, FinishReason, Result
from llmhost.server.protocols.base import Reply, sse

#: OpenAI's rule for function and schema names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Strict(BaseModel):
    """Unknown fields are refused (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only then')
        return self

    def target(self) -> dict[str, Any] | None:
        """The JSON schema the reply must validate against; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema is None:
            return {"type": "object"}
        return self.json_schema.schema_ or {"type": "object"}


class Sampling(Strict):
    """The fields both protocols take, with OpenAI's limits."""

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
    speculative: Literal["auto", "ngram", "draft", "off"] | None = Field(
        None, description="Extension: prompt-lookup speculation for this request (else --speculative)."
    )
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


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


def sampling_values(req: Sampling, max_tokens: int | None) -> dict[str, Any]:
    """GenerationParams values for the shared fields (only those the request sets)."""
    values: dict[str, Any] = {"json_schema": req.response_format.target() if req.response_format else None}
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "speculative"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    penalty = req.repetition_penalty or penalty_from_openai(req.presence_penalty, req.frequency_penalty)
    if penalty is not None:
        values["repetition_penalty"] = penalty
    return values


def reasoning_values(
    effort: str | None, template_kwargs: dict[str, Any] | None, default: bool | None
) -> dict[str, Any]:
    """Effort "none" turns thinking off, any other effort on; the template also gets the effort
    itself (gpt-oss templates read it) and the request's template variables, whose
    enable_thinking wins."""
    variables = dict(template_kwargs or {})
    reasoning = default
    if effort is not None:
        reasoning = effort != "none"
        variables.setdefault("reasoning_effort", effort)
    if "enable_thinking" in variables:
        reasoning = bool(variables.pop("enable_thinking"))
    return {"reasoning": reasoning, "template_kwargs": variables}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # OpenAI's field for prompt caching: tokens whose KV cache was reused
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class OpenAIReply(Reply):
    """One reply's objects (same id and created time throughout): a protocol supplies `object`
    names and how a chunk or a result becomes choices."""

    prefix: str
    chunk_object: str
    whole_object: str

    def __init__(
        self, model: str, include_usage: bool = False, report_dropped: bool = False, logprobs: bool = False
    ) -> None:
        self.model = model
        self.include_usage = include_usage
        self.report_dropped = report_dropped
        self.logprobs = logprobs
        # with stream_options.include_usage, OpenAI sends "usage": null on every chunk but the last
        self._usage: dict[str, Any] = {"usage": None} if include_usage else {}
        self.id = new_id(self.prefix)
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk_objects(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The stream objects for one engine chunk (none when it adds nothing)."""
        raise NotImplementedError

    def choice(self, result: Result) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, chunk: Chunk) -> Iterator[str]:
        for obj in self.chunk_objects(chunk):
            yield sse(obj)
        if chunk.finish_reason is not None and self.include_usage:
            yield sse(self.usage_chunk(chunk))

    def end(self) -> Iterator[str]:
        yield "data: [DONE]\n\n"

    def _chunk(self, choice: dict[str, Any], extension: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self._base(self.chunk_object), "choices": [choice], **self._usage, **(extension or {})}

    def extension(self, dropped_turns: int) -> dict[str, Any]:
        """llmhost's own facts, only for callers that asked for them (the truncation extension)."""
        return {"llmhost": {"dropped_turns": dropped_turns}} if self.report_dropped else {}

    def usage_chunk(self, last: Chunk) -> dict[str, Any]:
        return {
            **self._base(self.chunk_object),
            "choices": [],
            "usage": usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
            **self.extension(last.dropped_turns),
        }

    def whole(self, result: Result) -> dict[str, Any]:
        return {
            **self._base(self.whole_object),
            "choices": [self.choice(result)],
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            **self.extension(result.dropped_turns),
        }
