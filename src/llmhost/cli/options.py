"""CLI flags derived from the pydantic settings classes, so each option is declared once.

`@model_options(load=LoadSettings, params=GenerationParams)` adds one `--flag` per field (help
text from the field's description, default shown from the model) and hands the command a
validated instance under each keyword. Flags left out stay unset, so `LLMHOST_*` environment
variables and the models' own defaults apply.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError

from llmhost.engine.params import format_validation_error
from llmhost.errors import InvalidRequestError


def _cli_type(annotation: Any) -> Any:
    """Map a field annotation to one Typer understands (Literal → str, X | None → X | None)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _cli_type(args[0]) if len(args) == 1 else str
    if origin is list:
        return list[str]
    if annotation in (int, float, str, bool, Path):
        return annotation
    return str


def _shown_default(field: Any) -> str | bool:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return False
    default = field.default
    if default is None:
        return False
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _options_for(cls: type[BaseModel], exclude: frozenset[str]) -> list[inspect.Parameter]:
    params = []
    for name, field in cls.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = _cli_type(field.annotation)
        extra = (
            (field.json_schema_extra or {}).get("flags", [])
            if isinstance(field.json_schema_extra, dict)
            else []
        )
        decls = [f"{flag}/--no-{flag[2:]}"] if annotation is bool else [flag, *extra]
        option = typer.Option(None, *decls, help=field.description, show_default=_shown_default(field))
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation | None
            )
        )
    return params


def build(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    # a repeatable flag left out comes as () or []: unset, so that the field's default applies
    given = {k: v for k, v in values.items() if v is not None and not (isinstance(v, list | tuple) and not v)}
    try:
        return cls(**given)
    except ValidationError as err:
        message, param = format_validation_error(err, lambda loc: "--" + loc.replace("_", "-"))
        raise InvalidRequestError(f"invalid option {message}", param=param) from None


def model_options(
    exclude: frozenset[str] = frozenset(), **models: type[BaseModel]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`exclude` names fields that get no flag in this command (their default applies)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolves string annotations
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in sig.parameters.values()
            if p.name not in models
        ]
        # a field two models share (--speculative: the engine's default and this run's) is one
        # flag, given to both
        extra: dict[str, inspect.Parameter] = {}
        for cls in models.values():
            for p in _options_for(cls, exclude):
                extra.setdefault(p.name, p)

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = dict(kwargs)
            for arg, cls in models.items():
                fields = {name: given.get(name) for name in cls.model_fields}
                for name in fields:
                    kwargs.pop(name, None)
                kwargs[arg] = build(cls, fields)
            return fn(**kwargs)

        new_params = own + list(extra.values())
        wrapper.__signature__ = sig.replace(parameters=new_params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in new_params}
        return wrapper

    return decorate
