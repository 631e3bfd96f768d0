"""The coding agents run headless against the server on the embedded model, as a user sets them
up (docs/api.md): Claude Code (`claude -p`, ANTHROPIC_BASE_URL) over Anthropic Messages and
Codex CLI (`codex exec`, a model provider with wire_api = "responses") over OpenAI Responses,
each completing one turn. Their default prompts (≈29k and ≈10k tokens) do not fit the embedded
model's window: with their flags for a short system prompt and no built-in tools they fit, and
without them each prints the API's own error, never a 500.

`make test` installs both CLIs from npm into .agent-clis/; where npm is missing these tests are
skipped, unless LLMHOST_REQUIRE_AGENTS=1 (CI), which makes that a failure."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from engines import KEY, MODEL

BIN = Path(__file__).resolve().parents[1] / ".agent-clis" / "node_modules" / ".bin"
CLAUDE, CODEX = BIN / "claude", BIN / "codex"
if not (CLAUDE.exists() and CODEX.exists()):
    reason = f"the coding agents' CLIs are not installed in {BIN.parent.parent} (make agent-clis)"
    if os.environ.get("LLMHOST_REQUIRE_AGENTS") == "1":
        pytest.fail(f"LLMHOST_REQUIRE_AGENTS=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

ASK = "Say hello in one short sentence."
SHORT = "You are a helpful assistant. Answer briefly."


@pytest.fixture(scope="module")
def served(engine_server):
    return engine_server("llamacpp")


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # HOME apart: neither CLI reads or writes the user's own settings
    base = {"PATH": os.environ["PATH"], "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run(
        cmd,
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )


def test_claude_code_completes_a_turn_over_messages(served, tmp_path: Path) -> None:
    env = {
        "ANTHROPIC_BASE_URL": served.server.url,
        "ANTHROPIC_API_KEY": KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    # its default model name (claude-…) is answered by the served model (--model-alias)
    short = [str(CLAUDE), "-p", ASK, "--bare", "--system-prompt", SHORT, "--tools", ""]
    done = run([*short, "--model", "claude-sonnet-4-5", "--output-format", "json"], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["result"].strip(), result
    assert result["usage"]["input_tokens"] > 20 and result["usage"]["output_tokens"] > 0
    # its full prompt (system prompt and built-in tools) is far past the window: Anthropic's words
    # for that ("prompt is too long"), which Claude Code recognises and explains
    full = run([str(CLAUDE), "-p", ASK, "--model", "claude-sonnet-4-5"], env, tmp_path)
    assert full.returncode != 0
    assert "Prompt is too long" in full.stdout + full.stderr, full.stdout + full.stderr


CODEX_CONFIG = """
model = "{model}"
model_provider = "llmhost"

[model_providers.llmhost]
name = "llmhost"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "LLMHOST_API_KEY"
"""
# Codex's built-in tools and its long instructions off: what fits a small model's window
CODEX_SHORT = [
    "--disable", "shell_tool", "--disable", "unified_exec", "--disable", "multi_agent",
    "--disable", "goals", "--disable", "view_image", "--disable", "apps", "--disable", "plugins",
    "--disable", "image_generation", "--disable", "browser_use", "--disable", "computer_use",
    "--disable", "in_app_browser", "--disable", "skill_search", "-c", 'web_search="disabled"',
]  # fmt: skip


def test_codex_completes_a_turn_over_responses(served, tmp_path: Path) -> None:
    home = tmp_path / ".codex"
    home.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(model=MODEL, url=served.server.url))
    (tmp_path / "instructions.md").write_text(SHORT)
    env = {"CODEX_HOME": str(home), "LLMHOST_API_KEY": KEY}
    exec_ = [str(CODEX), "exec", "--skip-git-repo-check", "--ephemeral"]
    last = tmp_path / "last.txt"
    short = [*exec_, *CODEX_SHORT, "-c", f"model_instructions_file={tmp_path / 'instructions.md'}"]
    done = run([*short, "-o", str(last), ASK], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert last.read_text().strip(), done.stdout + done.stderr
    # by default it also sends a hosted web_search tool, which llmhost does not run: a 400 naming it
    full = run([*exec_, ASK], env, tmp_path)
    assert full.returncode != 0
    assert "'web_search', which llmhost does not run" in full.stdout + full.stderr
    # with web search off, its full prompt does not fit the window: OpenAI's context error code,
    # which Codex recognises
    full = run([*exec_, "-c", 'web_search="disabled"', ASK], env, tmp_path)
    assert full.returncode != 0
    assert "ran out of room in the model's context window" in full.stdout + full.stderr, full.stderr
