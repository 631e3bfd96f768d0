"""What every command shares: error handling, the console, model loading with a status line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from llmhost.config import LoadSettings
from llmhost.errors import InvalidRequestError, LlmhostError

console = Console(stderr=True, highlight=False, soft_wrap=True)  # whole lines: logs and greps stay intact


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn llmhost's errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LlmhostError as err:
            # escaped: an install hint's `llmhost[llamacpp]` is not Rich markup
            console.print(f"[red]error:[/red] {escape(str(err))}", markup=True, soft_wrap=True)
            raise typer.Exit(2 if isinstance(err, InvalidRequestError) else 1) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to `sys.stderr` as it is when a record comes, not as it was when the handler was
    made: a program that runs commands in its own process (Typer's CliRunner) swaps it."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def show_logs() -> None:
    """llmhost's own log lines (engine choice, vLLM start-up, failures) as `llmhost: ...` on stderr."""
    import logging

    logger = logging.getLogger("llmhost")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("llmhost: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def quiet_loading() -> None:
    """llmhost's log lines on; transformers' progress bars and warnings off (loading is ours to report)."""
    from transformers.utils import logging as hf_logging

    show_logs()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(ref: str | None, settings: LoadSettings) -> Any:
    from llmhost.engine import load

    quiet_loading()
    with console.status(f"Loading {ref or 'the embedded default model'}…"):
        return load(ref, settings)
