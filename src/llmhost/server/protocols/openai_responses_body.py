"""The Responses API's request body (pydantic, limits in Field): input items, tools and
namespaces of tools, text.format, reasoning. Unknown fields are accepted and ignored (Codex sends
many); what asks for something llmhost lacks is refused by name where the request is mapped."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Lenient
from llmhost.server.protocols.openai_common import NAME_PATTERN


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


class ToolIn(Lenient):
    """A function tool, or a namespace of them (Codex groups its agent tools so)."""

    type: str
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list[ToolIn] | None = Field(None, max_length=128)  # a namespace's


#: How the model sees a namespace's function: NAMESPACE__NAME (MCP clients name tools so too).
NAMESPACE_JOIN = "__"


def seen_as(name: str, namespace: str | None) -> str:
    return f"{namespace}{NAMESPACE_JOIN}{name}" if namespace else name


@dataclass(frozen=True)
class Function:
    """A function the model may call, under the name the model sees."""

    seen_as: str
    name: str
    namespace: str | None
    tool: ToolIn


def _functions(tools: list[ToolIn]) -> list[Function]:
    """Every function in `tools`, a namespace's spelled out; anything else is a 400 naming it."""
    out = []
    for i, tool in enumerate(tools):
        inner = [(f"tools[{i}]", tool, None)]
        if tool.type == "namespace" and tool.name is not None:
            inner = [(f"tools[{i}].tools[{j}]", t, tool.name) for j, t in enumerate(tool.tools or [])]
        for where, t, namespace in inner:
            if t.type != "function":
                raise InvalidRequestError(
                    f"{where} is a tool of type {t.type!r}, which llmhost does not run; send function "
                    "tools (type, name, parameters), in a namespace or not, and run the rest in the client",
                    where.replace("[", ".").replace("]", "") + ".type",
                )
            if t.name is None:
                raise InvalidRequestError(f"{where} needs a name", where.replace("[", ".").replace("]", ""))
            out.append(Function(seen_as(t.name, namespace), t.name, namespace, t))
    return out


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
    tools: list[ToolIn] | None = Field(None, max_length=128)
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

    @cached_property
    def functions(self) -> dict[str, Function]:
        """The functions offered, by the name the model sees (resolved once per request)."""
        found = _functions(self.tools or [])
        functions = {f.seen_as: f for f in found}
        if len(functions) != len(found):
            raise InvalidRequestError("tools: two functions have the same name", "tools")
        return functions
