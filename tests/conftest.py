"""Shared fixtures: a test home for llmhost, the embedded model, and a tiny random Llama.

The tiny model is built from a config (litgpt style) with the embedded model's real tokenizer,
so unit tests run the real loading and decoding code in milliseconds per token.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

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
            reply = embedded.generate(messages, GenerationParams(temperature=0, max_new_tokens=12)).text
            said[question] = words(reply).rpartition(" ")[0]
            assert said[question], f"the reference reply {reply!r} has too few words to compare"
        return said[question]

    return says


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


def build_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    config = LlamaConfig(
        **{**shape, **overrides},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from llmhost.config import LoadSettings
    from llmhost.engine import load

    return load(str(tiny_dir), LoadSettings(dtype="float32"))


@pytest.fixture(scope="session")
def engine_server(embedded_dir: Path):
    """`engine_server(kind)`: the shared `llmhost serve --engine kind` (see engines.py)."""
    from engines import require, start

    started = {}

    def get(kind: str):
        require(kind)
        if kind not in started:
            started[kind] = start(kind)
        return started[kind]

    yield get
    for served in started.values():
        served.stop()


def build_adapter(
    out: Path, base_dir: Path, seed: int, rank: int = 4, every_projection: bool = False, scale: float = 0.3
) -> Path:
    """A LoRA adapter for the model in `base_dir` with random (non-zero) weights, saved as peft
    saves one: each seed steers the model its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    if every_projection:  # as `llmhost finetune` trains them
        targets += ["k_proj", "gate_proj", "up_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, scale)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
