"""The one parameter class every front end maps onto (CLI flags, OpenAI requests, the web page)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmhost.errors import InvalidRequestError

MAX_STOP_STRINGS = 16


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
    truncate_history: bool = Field(
        True,
        description="Leave out the oldest turns when a conversation outgrows the context "
        "window (else it is an error).",
    )
    system: str | None = Field(
        None, description="System prompt, used when the conversation has none of its own."
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


def format_validation_error(
    err: ValidationError, name: Callable[[str], str] = lambda loc: loc
) -> tuple[str, str | None]:
    """One clause per problem, naming the parameter (through `name`) and the refused value."""
    parts: list[str] = []
    first_param: str | None = None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "parameters"
        first_param = first_param or loc
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown parameter"
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        parts.append(f"{name(loc)}: {msg}{shown}")
    return "; ".join(parts), first_param


def make_params(**values: object) -> GenerationParams:
    """Build params, turning pydantic's errors into one clear InvalidRequestError."""
    try:
        return GenerationParams(**values)  # type: ignore[arg-type]
    except ValidationError as err:
        message, param = format_validation_error(err)
        raise InvalidRequestError(f"invalid generation parameters: {message}", param=param) from None
