"""`llmhost ARGS` run in this process through Typer's CliRunner, with the result shaped like a
finished subprocess (returncode, stdout, stderr): the command line's own parsing, commands and
error handling, without a process start (python and torch imported again) per call. Tests of
what only a process shows (signals, Ctrl-C, a kill mid-write, startup time) start one instead."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

from typer.testing import CliRunner


def llmhost(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    from llmhost.cli import app

    environ = {**({"LLMHOST_HOME": str(home)} if home else {}), **(env or {})}
    with _logging_kept(), _hub_environment(environ):
        r = CliRunner().invoke(app, list(args), env=environ, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # the CLI turns every error into a message and an exit code; anything else is a bug
        raise r.exception
    return subprocess.CompletedProcess(["llmhost", *args], r.exit_code, r.stdout, r.stderr)


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """The logging set-up a command makes for its process (its handlers, levels, propagation,
    captured warnings) undone afterwards, so that one command run leaves the next test as it was."""
    loggers = [logging.getLogger(n) for n in ("llmhost", "py.warnings")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@contextlib.contextmanager
def _hub_environment(environ: dict[str, str]) -> Iterator[None]:
    """huggingface_hub reads its switches from the environment once, at import: a process started
    with `environ` would see them, so they are set where the library keeps them for the call."""
    import huggingface_hub.constants as hub

    names = [n for n in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET") if n in environ and hasattr(hub, n)]
    saved = {n: getattr(hub, n) for n in names}
    for n in names:
        setattr(hub, n, environ[n].strip().lower() in ("1", "true", "yes", "on"))
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(hub, n, value)
