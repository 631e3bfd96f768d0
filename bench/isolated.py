"""Run one measurement in a child process (its own threads and peak memory) and read back its
result: the child prints one `RESULT {json}` line, which `report()` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_repo_vllm() -> None:
    """`make test` builds vLLM's own virtualenv in the checkout (.venv-vllm): benches use it as
    the tests do, unless LLMHOST_VLLM_PYTHON names another."""
    python = REPO / ".venv-vllm" / "bin" / "python"
    if python.exists():
        os.environ.setdefault("LLMHOST_VLLM_PYTHON", str(python))


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def run(script: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
