"""Shared fixtures: a test home for llmhost, the embedded model, and a tiny random Llama.

The tiny model is built from a config (litgpt style) with the embedded model's real tokenizer,
so unit tests run the real loading and decoding code in milliseconds per token.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from llmhost.engine.request import GenerationRequest
from llmhost.testing import build_tiny_model
from rag_models import unpack_minilm

# Set before anything imports llmhost, so subprocesses started by tests inherit it too.
_home = os.environ.get("LLMHOST_TEST_HOME")
if not _home:
    import atexit
    import tempfile

    _home = tempfile.mkdtemp(prefix="llmhost-test-home-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)  # ≈1 GiB of converted models
os.environ["LLMHOST_HOME"] = _home
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(_home) / "vllm-cache"))
# The embedded model is a GGUF, which `auto` runs on llama.cpp where it is installed. Tests written
# for one engine name it; these default to transformers, and test_engines.py covers every engine.
os.environ.setdefault("LLMHOST_ENGINE", "transformers")
# `make test` builds vLLM's own virtualenv here (vLLM pins its own torch and transformers)
_vllm = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
if _vllm.exists():
    os.environ.setdefault("LLMHOST_VLLM_PYTHON", str(_vllm))


# Every process the tests start, by kind: a process start is the suite's dearest step (a model
# loaded from scratch, torch imported again), so each run reports how many it made.
_started: dict[str, int] = {}


def _count_starts(event: str, args: tuple) -> None:
    if event != "subprocess.Popen":
        return
    argv = [str(a) for a in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]])]
    line = " ".join(argv)
    if "-m llmhost serve" in line or line.startswith("llmhost serve"):
        kind = "llmhost serve"
    elif "vllm_child" in line:
        kind = "vLLM child"
    elif "-m llmhost" in line or "llmhost.cli" in line:
        kind = "llmhost CLI"
    elif "torch.distributed.run" in line or "torchrun" in line:
        kind = "torchrun"
    else:
        kind = Path(argv[0]).name if argv else "?"
    _started[kind] = _started.get(kind, 0) + 1


sys.addaudithook(_count_starts)


def pytest_terminal_summary(terminalreporter) -> None:
    if _started:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(_started.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(f"processes started by the tests: {sum(_started.values())} ({kinds})")


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_run():
    """Whatever a test started and left running (a server a failed test did not stop) ends with
    the session. (A crash of pytest itself: the servers die with it, procs.owned_popen.)"""
    yield
    import psutil

    left = psutil.Process().children(recursive=True)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(_home)


@pytest.fixture(scope="session")
def embedded_dir(home: Path) -> Path:
    """The embedded model converted to an HF folder (once per test home)."""
    from llmhost.engine import resolve_ref

    return resolve_ref(None).hf_folder()


@pytest.fixture(scope="session")
def embedded(embedded_dir: Path):
    from llmhost.engine import load

    return load()


def words(text: str) -> str:
    """A text's words, letters and digits only, one space apart: what a page or a terminal shows
    of a reply once markdown rendering and wrapping are set aside."""
    return " ".join(re.findall(r"\w+", text))


@pytest.fixture(scope="session")
def embedded_says(embedded):
    """`embedded_says(question)`: the start of the embedded model's greedy answer, computed here.
    A model's words come from its kernels, which differ between CPUs (AVX2, AVX-512, AMX), so a
    front end's reply is compared with this reference from the same machine and engine, never
    with a word one CPU happens to produce. The last word is dropped: it may be cut mid-word."""
    from llmhost.engine import GenerationParams

    said: dict[str, str] = {}

    def says(question: str) -> str:
        if question not in said:
            messages = [{"role": "user", "content": question}]
            reply = embedded.generate(
                GenerationRequest(messages, GenerationParams(temperature=0, max_new_tokens=12))
            ).text
            said[question] = words(reply).rpartition(" ")[0]
            assert said[question], f"the reference reply {reply!r} has too few words to compare"
        return said[question]

    return says


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers folder."""
    return unpack_minilm(tmp_path_factory.mktemp("models") / "all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from llmhost.config import LoadSettings
    from llmhost.engine import load

    return load(str(tiny_dir), LoadSettings(dtype="float32"))


@pytest.fixture(scope="session")
def engine_server(request: pytest.FixtureRequest, embedded_dir: Path):
    """`engine_server(kind)`: the shared `llmhost serve --engine kind` (see engines.py). vLLM's
    server, when a selected test uses vLLM, starts on a thread at once: its minute of start-up
    (one core, mostly importing) overlaps the tests that run before the first one asks for it."""
    from engines import missing, require, start, upstream_kind

    started: dict[str, Future] = {}
    # the thread stays until the end: vLLM's server is tied to the thread that started it
    # (procs.owned_popen's death signal)
    starter = ThreadPoolExecutor(1, thread_name_prefix="vllm-start")
    if missing("vllm") is None and any("vllm" in item.nodeid for item in request.session.items):
        started["vllm"] = starter.submit(start, "vllm")

    def get(kind: str):
        require(kind)
        if kind not in started:
            if kind == "vllm":
                started[kind] = starter.submit(start, kind)
            else:
                upstream = get(upstream_kind()) if kind == "openai" else None
                started[kind] = _done(start(kind, upstream))
        return started[kind].result()

    yield get
    for future in started.values():
        if future.exception() is None:  # a start that failed has failed its tests already
            future.result().stop()
    starter.shutdown()


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
