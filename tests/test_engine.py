"""The engine's decode loop on a tiny random Llama: fast, deterministic, every rule checked."""

from __future__ import annotations

import shutil
import threading

import pytest

from llmhost.config import LoadSettings
from llmhost.engine import GenerationParams, collect, load, stream_generate
from llmhost.engine.request import GenerationRequest
from llmhost.errors import ChatTemplateError, ContextOverflowError, InvalidRequestError, ModelNotFoundError

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
GREEDY = GenerationParams(temperature=0, max_new_tokens=24)


def test_greedy_is_deterministic_and_stream_equals_generate(tiny):
    a = tiny.generate(GenerationRequest(HELLO, GREEDY))
    b = tiny.generate(GenerationRequest(HELLO, GREEDY))
    chunks = list(stream_generate(tiny, GenerationRequest(HELLO, GREEDY)))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert "".join(c.text for c in chunks) == a.text
    assert [i for c in chunks for i in c.token_ids] == a.token_ids
    assert [c.finish_reason for c in chunks].count(None) == len(chunks) - 1


def test_max_new_tokens_gives_length_and_usage(tiny):
    r = tiny.generate(GenerationRequest(HELLO, GenerationParams(temperature=0, max_new_tokens=7)))
    assert r.finish_reason == "length"
    assert r.completion_tokens == 7 == len(r.token_ids)
    assert r.prompt_tokens == len(tiny.encode_chat(HELLO))
    assert r.ttft_s is not None and r.ttft_s > 0 and r.decode_tps and r.decode_tps > 0


def test_seed_reproduces_sampling_and_different_seeds_differ(tiny):
    p = GenerationParams(temperature=1.0, top_p=1.0, max_new_tokens=20, seed=1234)
    a, b = tiny.generate(GenerationRequest(HELLO, p)), tiny.generate(GenerationRequest(HELLO, p))
    assert a.token_ids == b.token_ids
    others = {
        tuple(tiny.generate(GenerationRequest(HELLO, p.model_copy(update={"seed": s}))).token_ids)
        for s in range(4)
    }
    assert len(others) > 1


def test_top_k_one_equals_greedy(tiny):
    p = GenerationParams(temperature=1.0, top_k=1, max_new_tokens=16, seed=7)
    assert (
        tiny.generate(GenerationRequest(HELLO, p)).token_ids
        == tiny.generate(GenerationRequest(HELLO, GREEDY.model_copy(update={"max_new_tokens": 16}))).token_ids
    )


def test_repetition_penalty_changes_greedy_output(tiny):
    plain = tiny.generate(GenerationRequest(HELLO, GREEDY))
    penalized = tiny.generate(GenerationRequest(HELLO, GREEDY.model_copy(update={"repetition_penalty": 3.0})))
    assert plain.token_ids != penalized.token_ids
    # a strong penalty on a random model avoids repeating tokens it already produced
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))


def test_stop_string_cuts_reply_and_never_leaks(tiny):
    full = tiny.generate(GenerationRequest(HELLO, GenerationParams(temperature=0, max_new_tokens=40))).text
    assert len(full) > 20
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    chunks = list(
        tiny.stream(GenerationRequest(HELLO, GenerationParams(temperature=0, max_new_tokens=40, stop=[stop])))
    )
    text = "".join(c.text for c in chunks)
    assert text == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    emitted = ""
    for c in chunks:
        emitted += c.text
        assert stop not in emitted


def test_cancel_stops_within_a_token(tiny):
    cancel = threading.Event()
    seen = []
    for chunk in tiny.stream(
        GenerationRequest(HELLO, GenerationParams(temperature=0, max_new_tokens=500), cancel=cancel)
    ):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    # the inference thread runs ahead of the reader by a few steps on a busy machine (the tiny
    # model decodes ~700 tokens/s); without the cancel it would run to 500
    assert seen[-1].finish_reason == "cancelled"
    assert 3 <= seen[-1].completion_tokens <= 50


def test_closing_the_stream_stops_generation(tiny):
    it = tiny.stream(GenerationRequest(HELLO, GenerationParams(temperature=0, max_new_tokens=500)))
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)


def test_system_param_is_used_when_messages_have_none(tiny):
    with_system = tiny.prepare(GenerationRequest(HELLO, GenerationParams(system="You are a pirate.")))[0]
    without = tiny.prepare(GenerationRequest(HELLO, GenerationParams()))[0]
    assert with_system != without
    assert "You are a pirate." in tiny.tokenizer.decode(with_system)
    own = [{"role": "system", "content": "Be terse."}, *HELLO]
    ids = tiny.prepare(GenerationRequest(own, GenerationParams(system="You are a pirate.")))[0]
    assert "pirate" not in tiny.tokenizer.decode(ids)


def test_plain_prompt_mode(tiny):
    r = tiny.generate(GenerationRequest(params=GREEDY, prompt="Once upon a time"))
    assert r.completion_tokens > 0
    assert r.prompt_tokens == len(tiny.tokenizer("Once upon a time")["input_ids"])
    with pytest.raises(InvalidRequestError, match="either messages or a prompt"):
        tiny.stream(GenerationRequest(HELLO, GREEDY, prompt="both"))


def test_long_history_drops_oldest_turns(tiny_dir):
    small = load(str(tiny_dir), LoadSettings(dtype="float32", context_length=120))
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"question number {i} " * 4},
            {"role": "assistant", "content": f"answer number {i} " * 4},
        ]
    history.append({"role": "user", "content": "and now?"})
    r = small.generate(GenerationRequest(history, GenerationParams(temperature=0, max_new_tokens=10)))
    assert r.dropped_turns > 0 and r.dropped_turns % 2 == 0
    assert r.prompt_tokens + 10 <= 120
    with pytest.raises(ContextOverflowError, match="context window is 120 tokens"):
        small.stream(GenerationRequest([{"role": "user", "content": "word " * 200}], GREEDY))
    with pytest.raises(ContextOverflowError):
        small.stream(GenerationRequest(params=GenerationParams(max_new_tokens=100), prompt="word " * 50))


def test_invalid_messages_raise_before_streaming(tiny):
    with pytest.raises(InvalidRequestError, match="role is 'robot'"):
        tiny.stream(GenerationRequest([{"role": "robot", "content": "x"}], GREEDY))


def test_missing_chat_template_is_a_clear_error_and_file_fixes_it(tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    model = load(str(bare), LoadSettings(dtype="float32"))
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        model.stream(GenerationRequest(HELLO, GREEDY))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    model = load(str(bare), LoadSettings(dtype="float32", chat_template=template))
    assert model.tokenizer.decode(model.encode_chat(HELLO)) == f"[user] {HELLO[0]['content']}\n[assistant] "


def test_chat_template_is_sandboxed(tiny_dir, tmp_path):
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    model = load(str(tiny_dir), LoadSettings(dtype="float32", chat_template=evil))
    with pytest.raises(ChatTemplateError):
        model.stream(GenerationRequest(HELLO, GREEDY))


def test_unknown_model_and_unsafe_folders(tmp_path, tiny_dir):
    with pytest.raises(ModelNotFoundError, match="no model 'nonexistent'"):
        load("nonexistent")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load(str(tmp_path))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="does not load pickle"):
        load(str(pickled))
    remote = tmp_path / "remote"
    shutil.copytree(tiny_dir, remote)
    cfg = (remote / "config.json").read_text().replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1)
    (remote / "config.json").write_text(cfg)
    with pytest.raises(Exception, match="--trust-remote-code"):
        load(str(remote))


def test_collect_needs_a_final_chunk():
    with pytest.raises(RuntimeError):
        collect(iter([]))
