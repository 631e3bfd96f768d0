"""Chat templates, rendered one way for every engine that tokenizes: transformers' sandboxed
Jinja environment (no file or attribute access beyond what templates are allowed), the model's
special tokens as variables (`bos_token`, `eos_token`, ...), a time budget, and one error shape."""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from llmhost.engine.context import Message
from llmhost.engine.tools import uses_tools
from llmhost.errors import ChatTemplateError, InvalidRequestError, LlmhostError

#: Seconds a template may take to render (real ones take milliseconds; the sandbox stops file and
#: attribute access, not loops, so a template that never ends is stopped here).
RENDER_BUDGET_S = 5.0
# what Jinja names the code it compiles a template string into
_TEMPLATE_CODE = "<template>"
#: Variables a request's chat_template_kwargs may not set (the renderer's own).
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "chat_template"})


class ChatTemplate:
    """A model's chat template. `encode()` renders and tokenizes so that text inside messages is
    always text: a user who types `<|im_start|>system` gets those characters, never the control
    token, so nobody can forge a turn; only the template's own markup makes control tokens."""

    def __init__(
        self,
        source: str | None,
        model: str,
        special_tokens: Mapping[str, object],
        control_tokens: Iterable[str] = (),
        budget_s: float = RENDER_BUDGET_S,
    ) -> None:
        self.source = source or None
        self.model = model
        self.budget_s = budget_s
        #: What templates see besides the messages, as transformers' apply_chat_template passes it.
        self.variables = {k: v for k, v in special_tokens.items() if isinstance(v, str | list)}
        self.control_tokens = tuple(sorted({t for t in control_tokens if t}, key=len, reverse=True))
        # compiled once per model (Qwen-1 has 208 control tokens); each request only draws a nonce
        escaped = "|".join(map(re.escape, self.control_tokens))
        self._find = re.compile(escaped) if escaped else None
        #: Whether the model thinks in `<think>` blocks (Qwen3, QwQ, DeepSeek-R1 distills).
        self.thinks = bool(self.source) and "<think>" in (self.source or "")
        #: Whether the template renders `tools` itself (else tools.py's fallback describes them).
        self.native_tools = uses_tools(self.source)

    def render(
        self,
        messages: list[Message],
        marker: Marker | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; with a `marker`, control-token text inside messages, tool descriptions
        and the request's own template variables is fenced off."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.source is None:
            raise ChatTemplateError(
                f"the model {self.model} has no chat template: pass --chat-template FILE "
                "(a Jinja file), or send a plain prompt instead of messages"
            )
        extra = dict(variables or {})
        if reserved := sorted(RESERVED & extra.keys()):
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(reserved)} (llmhost sets them)",
                param="chat_template_kwargs",
            )
        if marker is not None:
            messages, tools, extra = marker.mark(messages), marker.mark(tools), marker.mark(extra)
        try:
            with _time_budget(self.budget_s, self.model):
                rendered, _ = render_jinja_template(
                    conversations=[messages],
                    tools=tools or None,
                    chat_template=self.source,
                    add_generation_prompt=add_generation_prompt,
                    **{**self.variables, **extra},
                )
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template refused these messages: {err}") from None
        except LlmhostError:
            raise
        except Exception as err:  # recursion, memory, the sandbox's limits, a bad operation on a value
            detail = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            raise ChatTemplateError(
                f"the chat template of {self.model} failed on these messages ({detail}): fix the template "
                "or pass another with --chat-template"
            ) from None
        return rendered[0]

    def marker(self) -> Marker:
        return Marker(self.control_tokens, self._find)

    def encode(
        self,
        messages: list[Message],
        markup: Callable[[str], list[int]],
        plain: Callable[[str], list[int]],
        tools: list[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of the prompt: the template's text through `markup` (control tokens parsed),
        control-token text that came from messages through `plain` (as characters)."""
        marker = self.marker()
        ids: list[int] = []
        rendered = self.render(messages, marker, tools=tools, variables=variables)
        for _, text, is_markup in marker.split(rendered):
            ids += markup(text) if is_markup else plain(text)
        return ids


class Marker:
    """Fences control-token text inside message strings with markers nobody can type (private-use
    characters around a random nonce), so the rendered prompt can be split into the template's
    markup and the messages' control-token look-alikes."""

    def __init__(self, control_tokens: tuple[str, ...], find: re.Pattern[str] | None) -> None:
        self.tokens = control_tokens
        nonce = secrets.token_hex(8)
        self._find = find  # any of the control tokens
        self._index = {t: i for i, t in enumerate(control_tokens)}
        self._tag = f"\ue000{nonce}{{}}\ue001"
        self._split = re.compile(f"\ue000{nonce}(\\d+)\ue001")

    def mark(self, value: Any) -> Any:
        """Messages (or tools, or variables) with control-token text fenced off."""
        return value if self._find is None else self._mark(value)

    def _mark(self, value: Any) -> Any:
        if isinstance(value, str):
            assert self._find is not None
            return self._find.sub(lambda m: self._tag.format(self._index[m.group(0)]), value)
        if isinstance(value, list):
            return [self._mark(v) for v in value]
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        return value

    def split(self, rendered: str) -> Iterator[tuple[int, str, bool]]:
        """(start in `rendered`, text, is markup) pieces; non-markup pieces are one token's text."""
        at = 0
        for m in self._split.finditer(rendered):
            if m.start() > at:
                yield at, rendered[at : m.start()], True
            yield m.start(), self.tokens[int(m.group(1))], False
            at = m.end()
        if at < len(rendered):
            yield at, rendered[at:], True


def control_tokens(special: Iterable[str], added: Iterable[str], source: str | None) -> list[str]:
    """The token texts a message must not produce: every special token, and the other added
    tokens the template writes itself (not whitespace ones, which templates use as text)."""
    return [*special, *(t for t in added if source and t in source and not t.isspace())]


class _OutOfTime(BaseException):
    """Raised inside the render once its time is up: a BaseException, so that no `except
    Exception` in a filter or test swallows it (Python drops the trace function once it raises,
    so a swallowed one would leave the loop running unwatched)."""


@functools.cache
def _watched_prefix() -> str:
    """Where Jinja's own Python code lives: its filters, tests and loop objects run a template's
    loops too (`select`, `map`, `join` over long lists), so their lines are watched as well."""
    import jinja2

    return str(Path(jinja2.__file__).parent)


@contextlib.contextmanager
def _time_budget(seconds: float, model: str) -> Iterator[None]:
    """Abandon rendering after `seconds`: a trace function on the template's compiled code and
    Jinja's own (only there, so the cost is a clock read per line of theirs) raises once time is
    up, and the render's thread stops with it."""
    deadline = time.monotonic() + seconds
    jinja = _watched_prefix()

    def check(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfTime
        return check

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        return check(frame, event, arg) if name == _TEMPLATE_CODE or name.startswith(jinja) else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    except _OutOfTime:
        raise ChatTemplateError(
            f"the chat template of {model} did not finish rendering within {seconds:g} s (it loops "
            "too long for these messages): fix the template or pass another with --chat-template"
        ) from None
    finally:
        sys.settrace(previous)
