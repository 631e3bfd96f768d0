"""The one parameter class every front end maps onto (CLI flags, OpenAI requests, the web page)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmhost.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class GenerationParams(BaseModel):
    """Sampling and stopping parameters for one generation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(512, ge=1, le=131072, description="Most tokens to generate.")
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, description="Sampling temperature; 0 means greedy (deterministic)."
    )
    top_p: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p.",
    )
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="Penalty (>1) for tokens already in the prompt or reply; 1 disables it.",
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Random seed: the same seed gives the same reply."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description="Stop when this text appears (repeatable); it is never part of the reply.",
    )
    fit_max_tokens: bool = Field(
        False,
        description="Treat max_new_tokens as a ceiling: lower it to what the context window leaves "
        "after the prompt, instead of refusing (agents ask for 32000 of a small model).",
    )
    truncate_history: bool = Field(
        True,
        description="Leave out the oldest turns when a conversation outgrows the context "
        "window (else it is an error).",
    )
    system: str | None = Field(
        None, description="System prompt, used when the conversation has none of its own."
    )
    # -- what the reply must look like (apps and agents) ----------------------------------------
    tools: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Functions the model may call, as OpenAI tool objects ({type, function}).",
    )
    tool_choice: Literal["none", "auto", "required"] = Field(
        "auto", description="none: never call; auto: the model decides; required: call at least one."
    )
    tool_name: str | None = Field(None, description="Call exactly this function (a named tool_choice).")
    parallel_tool_calls: bool | None = Field(
        None,
        description="Whether one reply may hold several calls; a forced call (tool_choice required) "
        "is one call unless this is true, a free reply keeps only the first when it is false.",
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="The reply is JSON that validates against this schema (constrained decoding)."
    )
    reasoning: bool | None = Field(
        None, description="Whether a thinking model thinks first; None: the model's (or server's) default."
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra variables for the chat template (enable_thinking, ...)."
    )
    speculative: Literal["auto", "ngram", "draft", "off"] | None = Field(
        None,
        description="Speculation for this reply: auto (prompt lookup where the engine checks "
        "proposals exactly), ngram (prompt lookup always), draft (the --draft-model), off; None: "
        "the server's --speculative.",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Report each token's log probability and this many alternatives; None: off.",
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def offers_tools(self) -> bool:
        """Whether the prompt describes tools and the reply is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool(self) -> bool:
        return self.offers_tools and (self.tool_choice == "required" or self.tool_name is not None)


def format_validation_error(
    err: ValidationError, name: Callable[[str], str] = lambda loc: loc
) -> tuple[str, str | None]:
    """One clause per problem, naming the parameter (through `name`) and the refused value."""
    parts: list[str] = []
    first_param: str | None = None
    errors = err.errors()
    # a union's branches: where a value fits one branch but is wrong inside it, the other
    # branches' "not a string" noise is left out, and no branch label shows in the location
    inside = [e for e in errors if not e["type"].endswith("_type")]
    for e in errors:
        if inside and e["type"].endswith("_type") and any(_is_branch(p) for p in e["loc"]):
            continue
        loc = ".".join(str(p) for p in e["loc"] if not _is_branch(p)) or "parameters"
        first_param = first_param or loc
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown parameter"
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        parts.append(f"{name(loc)}: {msg}{shown}")
    return "; ".join(parts), first_param


def _is_branch(part: object) -> bool:
    """A union branch's label in pydantic's error location ('str', 'list[...]')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def make_params(**values: object) -> GenerationParams:
    """Build params, turning pydantic's errors into one clear InvalidRequestError."""
    try:
        return GenerationParams(**values)  # type: ignore[arg-type]
    except ValidationError as err:
        message, param = format_validation_error(err)
        raise InvalidRequestError(f"invalid generation parameters: {message}", param=param) from None
