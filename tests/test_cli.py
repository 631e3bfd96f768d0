"""The CLI through Typer's runner (fast, tiny model) and as a real subprocess (embedded model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import words
from llmhost.cli import app

runner = CliRunner()


def _run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_generate_json_on_tiny_model(tiny_dir):
    r = _run(
        "generate",
        str(tiny_dir),
        "Hello",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "--dtype",
        "float32",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5
    assert data["timings"]["decode_tokens_per_s"] > 0


def test_generate_reads_stdin_and_raw_mode(tiny_dir):
    r = _run(
        "generate",
        str(tiny_dir),
        "-",
        "--raw",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        input="Once upon a time",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["generate", "hi", "--temperature", "-1"],
            2,
            "error: invalid option --temperature: Input should be greater than or equal to 0",
        ),
        (["generate", "hi", "--top-p", "2"], 2, "--top-p: Input should be less than or equal to 1"),
        (["generate", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
        (["generate", "hi", "--dtype", "float8"], 2, "--dtype: Input should be 'auto', 'float32'"),
        (["generate", "hi", "--stop", ""], 2, "stop strings must not be empty"),
        (["generate", "no/such/model", "hi"], 1, "error: no model 'no/such/model'"),
        (["generate", "a", "b", "c"], 2, "at most two arguments"),
        (["generate", "   "], 2, "the prompt is empty"),
        (["generate", "hi", "--kv-cache-gib", "0"], 2, "--kv-cache-gib: Input should be greater than 0"),
        (["generate", "hi", "--engine", "vllm", "--vllm-args", "--max-num-seqs '4"], 2, "check its quotes"),
        (
            ["generate", "hi", "--engine", "tpu"],
            2,
            "--engine: Input should be 'auto', 'transformers', 'llamacpp'",
        ),
        (
            ["generate", "hi", "--prefix-cache", "lossy"],
            2,
            "--prefix-cache: Input should be 'exact' or 'fast'",
        ),
        (["web", "--host", "0.0.0.0"], 2, "puts the chat page on the network with no login"),
        (["web", "--server", "ftp://example"], 2, "invalid option --server: must be an http(s) URL"),
        (["web", "some-model", "--server", "http://127.0.0.1:9/v1"], 2, "not both"),
        (["web", "--db", "/proc/no-such-dir/c.db"], 2, "cannot open the conversation database"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, code, message):
    r = _run(*args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreadable_inputs_are_one_line_errors(tiny_dir, tmp_path, home):
    r = _run("generate", str(tiny_dir), "hi", "--chat-template", str(tmp_path / "missing.jinja"))
    assert r.exit_code == 1 and "cannot read --chat-template" in r.stderr and "No such file" in r.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    r = _run("generate", str(junk), "hi")
    assert r.exit_code == 1 and "could not be read as a GGUF model" in r.stderr, r.output
    assert "Traceback" not in r.output
    leftovers = [p.name for p in (home / "converted").iterdir() if "junk" in p.name]
    assert leftovers == [], "a failed conversion must leave nothing behind"


def test_serve_key_file_errors(tmp_path):
    r = _run("serve", "--api-key-file", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "cannot read --api-key-file" in r.stderr
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    r = _run("serve", "--api-key-file", str(empty))
    assert r.exit_code == 2 and "holds no key" in r.stderr


def test_serving_limits_are_not_chat_flags():
    r = _run("chat", "--help")
    assert "--max-concurrency" not in r.stdout and "--temperature" in r.stdout
    assert "--max-concurrency" in _run("serve", "--help").stdout


def test_context_overflow_message(tiny_dir):
    r = _run("generate", str(tiny_dir), "word " * 100, "--context-length", "64", "--dtype", "float32")
    assert r.exit_code == 2
    assert "context window is 64 tokens" in r.stderr


def test_chat_multi_turn_commands_and_stats(tiny_dir):
    script = "\n".join(["/help", "Hi!", "/system You are terse.", "Hello again", "/clear", "/bogus", "/exit"])
    r = _run(
        "chat",
        str(tiny_dir),
        "--dtype",
        "float32",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        input=script + "\n",
    )
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "/system TEXT" in err  # help text
    assert err.count("4 tokens") == 2 and "tok/s" in err
    assert "system prompt set; conversation cleared" in err
    assert "conversation cleared" in err and "unknown command /bogus" in err


def test_chat_keeps_history_across_turns(tiny_dir, monkeypatch):
    from llmhost.cli.chat import ChatSession
    from llmhost.config import LoadSettings
    from llmhost.engine import GenerationParams, load

    engine = load(str(tiny_dir), LoadSettings(dtype="float32"))
    lines = iter(["first question", "second question"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    import io

    session = ChatSession(
        engine, GenerationParams(temperature=0, max_new_tokens=3), read=read, out=io.StringIO()
    )
    session.run()
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] == "second question"


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, llmhost.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "llmhost", "--help"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and "chat" in out.stdout and "generate" in out.stdout
    assert elapsed < 1.5, f"--help took {elapsed:.2f}s"


def test_version():
    from llmhost import __version__

    r = _run("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


@pytest.mark.slow
def test_generate_subprocess_on_embedded_model(embedded_says):
    out = subprocess.run(
        [sys.executable, "-m", "llmhost", "generate", "What is the capital of France?", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert embedded_says("What is the capital of France?") in words(out.stdout)


@pytest.mark.slow
def test_chat_subprocess_ctrl_c_stops_reply_not_chat(embedded_says):
    """A real terminal-like session: Ctrl-C mid-reply stops it; the chat answers the next question."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "llmhost", "chat", "--temperature", "0", "--max-new-tokens", "400"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write("Write a very long story about a dragon.\n")
    proc.stdin.flush()
    first = proc.stdout.read(40)  # the reply has started streaming
    assert first
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("What is the capital of France?\n/exit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped" in err
    assert embedded_says("What is the capital of France?") in words(out)
    assert "Traceback" not in err


def test_web_reports_a_model_server_that_fails_to_start(tmp_path):
    r = _run("web", str(tmp_path / "no-such-model"), "--no-open-browser", "--db", str(tmp_path / "c.db"))
    assert r.exit_code == 1, r.output
    assert "the model server exited before it was ready" in r.stderr
    assert "error: no model" in r.stderr  # the child's own message is passed on


def test_an_error_prints_its_brackets(monkeypatch) -> None:
    # Rich would read `[llamacpp]` as markup and drop it from an install hint
    import typer
    from rich.console import Console

    from llmhost.cli import common
    from llmhost.errors import LlmhostError

    out = Console(record=True, width=300)
    monkeypatch.setattr(common, "console", out)

    @common.command
    def failing() -> None:
        raise LlmhostError("the llama.cpp engine is not installed: pip install 'llmhost[llamacpp]'")

    with pytest.raises(typer.Exit) as exit_:
        failing()
    assert exit_.value.exit_code == 1
    assert "error: the llama.cpp engine is not installed: pip install 'llmhost[llamacpp]'" in (
        out.export_text()
    )
