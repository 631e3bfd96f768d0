"""`llmhost ARGS` run in this process through Typer's CliRunner, with the result shaped like a
finished subprocess (returncode, stdout, stderr): the command line's own parsing, commands and
error handling, without a process start (python and torch imported again) per call. Tests of
what only a process shows (signals, Ctrl-C, a kill mid-write, startup time) start one instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

from typer.testing import CliRunner


def llmhost(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    from llmhost.cli import app

    environ = {**({"LLMHOST_HOME": str(home)} if home else {}), **(env or {})}
    r = CliRunner().invoke(app, list(args), env=environ, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # the CLI turns every error into a message and an exit code; anything else is a bug
        raise r.exception
    return subprocess.CompletedProcess(["llmhost", *args], r.exit_code, r.stdout, r.stderr)
