"""`llmhost finetune` for real: preflight messages, learning a made-up fact on the embedded model,
resume after SIGKILL (and after a kill during a checkpoint save) equal to an uninterrupted run,
the result in the store, merge, and serving it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import cli
from llmhost.finetune.data import encode, read_jsonl, tokenize
from llmhost.store.local import Store

DATA = Path(__file__).parent / "data" / "zorblax.jsonl"
QUESTION = "What is the capital of the planet Zorblax?"


def llmhost(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`llmhost ARGS` with `home` as its home, in this process (tests/cli.py); the tests of a
    kill mid-run and of several processes (torchrun) start real ones."""
    return cli.llmhost(*args, home=home)


@pytest.fixture
def ft_home(tmp_path: Path, home: Path, embedded_dir: Path) -> Path:
    """A fresh llmhost home that reuses the session's converted embedded model."""
    fresh = tmp_path / "home"
    fresh.mkdir()
    (fresh / "converted").symlink_to(home / "converted")
    return fresh


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- preflight -------------------------------------------------------------------------------


def test_formats_are_detected_per_line(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
            ),
            json.dumps({"instruction": "Add", "input": "2+2", "output": "4", "system": "Be exact."}),
            json.dumps(
                {"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}
            ),
            "",
        ],
    )
    pre = read_jsonl(data)
    assert [(e.line, e.format) for e in pre.examples] == [(1, "chat"), (2, "alpaca"), (3, "sharegpt")]
    assert pre.examples[1].messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]
    items = tokenize(pre, tokenizer, 384)
    learned = [
        tokenizer.decode([t for t, lab in zip(i.input_ids, i.labels, strict=True) if lab != -100])
        for i in items
    ]
    assert learned == ["hello<|im_end|>\n", "4<|im_end|>\n", "yo<|im_end|>\n"]  # replies only


def test_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            json.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            ),
            '{"messages": [oops',
            json.dumps(
                {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}]}
            ),
            json.dumps(
                {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}
            ),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
            json.dumps({"text": "raw"}),
            json.dumps({"conversations": [{"from": "alien", "value": "x"}]}),
        ],
    )
    pre = read_jsonl(data)
    assert [e.line for e in pre.examples] == [1]
    assert [(p.line, p.reason) for p in pre.problems] == [
        (2, "json"), (3, "role"), (4, "empty"), (5, "no_reply"), (6, "format"), (7, "role"),
    ]  # fmt: skip
    report = pre.report()
    assert report[0].startswith("2 × unknown role (line 3, 7): unknown role 'wizard'")
    assert any(r.startswith("1 × invalid JSON (line 2):") for r in report)


def test_preflight_failures_from_the_command_line(ft_home: Path, tmp_path: Path, embedded_dir: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": [oops', json.dumps({"text": "x"})])
    r = llmhost(ft_home, "finetune", "--data", str(bad), "--name", "x")
    assert r.returncode == 2
    assert "has no usable example: 1 × invalid JSON (line 1)" in r.stderr and "1 × not chat" in r.stderr

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [DATA.read_text().splitlines()[0], '{"messages": [oops'])
    r = llmhost(ft_home, "finetune", "--data", str(mixed), "--name", "x", "--strict")
    assert r.returncode == 2 and f"{mixed}:2: invalid JSON" in r.stderr and "without --strict" in r.stderr

    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    r = llmhost(ft_home, "finetune", "--data", str(empty), "--name", "x")
    assert r.returncode == 2 and "has no usable example: the file has no lines" in r.stderr

    r = llmhost(ft_home, "finetune", "--data", str(DATA), "--name", "x", "--max-length", "16")
    assert r.returncode == 2 and "8 × too long after tokenization (line 1, 2, 3, 4, 5, …)" in r.stderr
    assert "> --max-length 16" in r.stderr
    assert Store(ft_home / "models").list() == []

    r = llmhost(ft_home, "finetune", "--data", str(tmp_path / "missing.jsonl"), "--name", "x")
    assert r.returncode == 2 and "cannot read" in r.stderr


# --- learning is real --------------------------------------------------------------------------


def test_the_default_recipe_teaches_a_made_up_fact(ft_home: Path, tmp_path: Path) -> None:
    """24 examples of a made-up fact and no training flag at all (the recipe used to end 'green'
    and unlearned): eval loss per epoch falls, the result is a LoRA model in the store that
    answers with the fact, and a second run under the same name is refused."""
    base = llmhost(ft_home, "generate", QUESTION, "--temperature", "0", "--max-new-tokens", "16")
    assert base.returncode == 0 and "Quibbletown" not in base.stdout
    data = tmp_path / "z24.jsonl"
    data.write_text(DATA.read_text() * 3)
    r = llmhost(ft_home, "finetune", "--data", str(data), "--eval", str(DATA), "--name", "zorblax")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and "24 examples" in r.stderr
    assert "epoch 3: eval loss" in r.stderr and "examples/s" in r.stderr
    model = Store(ft_home / "models").get("zorblax")
    assert model.format == "lora" and model.extra["base"] == "default"
    assert model.extra["eval_losses"][-1] < model.extra["eval_losses"][0]
    for question in (QUESTION, "Which city is the capital of Zorblax?"):
        greedy = ("--temperature", "0", "--max-new-tokens", "16")
        tuned = llmhost(ft_home, "generate", "zorblax", question, *greedy)
        assert tuned.returncode == 0, tuned.stderr
        assert "Quibbletown" in tuned.stdout, (question, tuned.stdout)
        assert "Warning" not in tuned.stderr, tuned.stderr  # llmhost's words only, no library noise
    again = llmhost(ft_home, "finetune", "--data", str(DATA), "--name", "zorblax")
    assert again.returncode == 2 and "already has 'zorblax'" in again.stderr and "--overwrite" in again.stderr


# --- checkpoints and resume (tiny model: fast) ---------------------------------------------------

TINY_ARGS = ["--lr", "1e-3", "--epochs", "12", "--batch-size", "2", "--save-steps", "4", "--seed", "7"]


def adapter_tensors(home: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Store(home / "models").get(name).folder / "adapter_model.safetensors"))


def run_until_checkpoint(home: Path, args: list[str], step: int) -> str:
    """Start a run and SIGKILL it as soon as it reports the checkpoint at `step`."""
    env = {**os.environ, "LLMHOST_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmhost", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    killed = threading.Event()
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if f"checkpoint at step {step}" in line:
            proc.send_signal(signal.SIGKILL)
            killed.set()
            break
    proc.wait(60)
    assert killed.is_set(), "".join(lines)
    return "".join(lines)


def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(ft_home: Path, tiny_dir: Path) -> None:
    args = ["finetune", str(tiny_dir), "--data", str(DATA), *TINY_ARGS]
    r = llmhost(ft_home, *args, "--name", "whole")
    assert r.returncode == 0, r.stderr
    whole = adapter_tensors(ft_home, "whole")

    run_until_checkpoint(ft_home, [*args, "--name", "split"], step=8)
    assert Store(ft_home / "models").get("split") is None  # a killed run is not a model
    r = llmhost(ft_home, *args, "--name", "split")  # the same command again
    assert r.returncode == 0, r.stderr
    assert re.search(r"resuming at step (8|12) of 48", r.stderr), r.stderr
    split = adapter_tensors(ft_home, "split")
    assert whole.keys() == split.keys()
    for key in whole:
        assert (whole[key] - split[key]).abs().max() < 1e-5, key


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_one(ft_home: Path, tiny_dir: Path) -> None:
    args = ["finetune", str(tiny_dir), "--data", str(DATA), *TINY_ARGS]
    r = llmhost(ft_home, *args, "--name", "whole")
    assert r.returncode == 0, r.stderr
    run_until_checkpoint(ft_home, [*args, "--name", "cut"], step=8)
    ckpts = ft_home / "finetune" / "cut" / "checkpoints"
    for later in [p for p in ckpts.iterdir() if p.name > "checkpoint-000008"]:
        shutil.rmtree(later)  # the save after step 8 never finished...
    partial = ckpts / ".tmp-000012-99999"  # ...and left what a kill mid-save leaves
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\0" * 100)
    r = llmhost(ft_home, *args, "--name", "cut", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 8 of 48" in r.stderr
    whole, cut = adapter_tensors(ft_home, "whole"), adapter_tensors(ft_home, "cut")
    assert all((whole[k] - cut[k]).abs().max() < 1e-5 for k in whole)
    assert not (ft_home / "finetune" / "cut").exists()  # checkpoints are removed once stored


def test_a_different_run_with_the_same_name_is_not_mixed_in(ft_home: Path, tiny_dir: Path) -> None:
    args = ["finetune", str(tiny_dir), "--data", str(DATA), *TINY_ARGS, "--name", "mixed"]
    run_until_checkpoint(ft_home, args, step=4)
    r = llmhost(ft_home, *args[:-2], "--lr", "5e-4", "--name", "mixed")  # other options, same name
    assert r.returncode == 2 and "with other data or options exists" in r.stderr and "--overwrite" in r.stderr
    r = llmhost(ft_home, "finetune", str(tiny_dir), "--data", str(DATA), "--name", "nothing", "--resume")
    assert r.returncode == 2 and "no run named 'nothing' to resume" in r.stderr


def test_merge_and_serve_the_result(ft_home: Path, tiny_dir: Path) -> None:
    r = llmhost(ft_home, "finetune", str(tiny_dir), "--data", str(DATA), *TINY_ARGS, "--name", "tuned")
    assert r.returncode == 0, r.stderr
    r = llmhost(ft_home, "merge", "tuned", "--out", "tuned-merged")
    assert r.returncode == 0, r.stderr
    merged = Store(ft_home / "models").get("tuned-merged")
    assert merged.format == "hf" and (merged.folder / "model.safetensors").exists()
    assert (merged.folder / "tokenizer.json").exists()
    outs = []
    for name in ("tuned", "tuned-merged"):
        g = llmhost(
            ft_home, "generate", name, QUESTION, "--temperature", "0", "--max-new-tokens", "12", "--json"
        )
        assert g.returncode == 0, g.stderr
        outs.append(json.loads(g.stdout)["text"])
    assert outs[0] == outs[1]  # the adapter merged at load time equals the merged model
    base = llmhost(
        ft_home, "generate", str(tiny_dir), QUESTION, "--temperature", "0", "--max-new-tokens", "12", "--json"
    )
    assert json.loads(base.stdout)["text"] != outs[0]  # and the training changed the model

    from servers import LocalServer

    server = LocalServer("tuned", home=ft_home)
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["tuned"]
        reply = client.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12
        )
        assert reply.choices[0].message.content == outs[0]
    finally:
        server.stop()


def test_qlora_without_a_gpu_says_why(ft_home: Path, tiny_dir: Path) -> None:
    r = llmhost(ft_home, "finetune", str(tiny_dir), "--data", str(DATA), "--name", "q", "--qlora")
    assert r.returncode == 1 and "--qlora needs a CUDA GPU and the bitsandbytes package" in r.stderr


def test_target_modules_are_found_in_the_model(tiny) -> None:
    from llmhost.finetune.trainer import linear_layer_names

    assert linear_layer_names(tiny.model) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_encode_marks_every_reply_of_a_multi_turn_chat(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    ids, labels = encode(tokenizer, messages)
    learned = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert learned == "first<|im_end|>\nsecond<|im_end|>\n"


def test_data_parallel_run_equals_one_process_with_the_combined_batch(ft_home: Path, tiny_dir: Path) -> None:
    """Two processes (torchrun, gloo on the CPU; `accelerate launch` on GPUs) with batch 2 each
    take the same examples per step as one process with batch 4: the results must agree."""
    common = ["finetune", str(tiny_dir), "--data", str(DATA), "--epochs", "4", "--lr", "1e-3",
              "--dropout", "0", "--seed", "3", "--save-steps", "3"]  # fmt: skip
    env = {**os.environ, "LLMHOST_HOME": str(ft_home)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llmhost"]
    r = subprocess.run([*torchrun, *common, "--batch-size", "2", "--name", "ddp"], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 steps" in r.stderr and "× 2 processes" in r.stderr
    assert r.stderr.count("✓ ddp") == 1  # one process reports and stores the result
    single = llmhost(ft_home, *common, "--batch-size", "4", "--name", "single")
    assert single.returncode == 0, single.stderr
    ddp, one = adapter_tensors(ft_home, "ddp"), adapter_tensors(ft_home, "single")
    assert max((ddp[k] - one[k]).abs().max().item() for k in ddp) < 1e-5


def test_gradient_accumulation_equals_the_bigger_batch(ft_home: Path, tiny_dir: Path) -> None:
    # every example here has the same number of reply tokens, so a mean of means is the mean
    common = ["finetune", str(tiny_dir), "--data", str(DATA), "--epochs", "2", "--lr", "1e-3",
              "--dropout", "0", "--seed", "5"]  # fmt: skip
    r = llmhost(ft_home, *common, "--batch-size", "2", "--grad-accum", "2", "--name", "accum")
    assert r.returncode == 0 and "4 steps" in r.stderr, r.stderr
    r = llmhost(ft_home, *common, "--batch-size", "4", "--name", "big")
    assert r.returncode == 0, r.stderr
    accum, big = adapter_tensors(ft_home, "accum"), adapter_tensors(ft_home, "big")
    assert max((accum[k] - big[k]).abs().max().item() for k in accum) < 1e-5


def test_a_run_that_learned_nothing_says_so(ft_home: Path, tiny_dir: Path) -> None:
    r = llmhost(ft_home, "finetune", str(tiny_dir), "--data", str(DATA), "--name", "idle", "--lr", "1e-7")
    assert r.returncode == 0, r.stderr
    assert "warning: the final train loss" in r.stderr and "still high for 8 examples" in r.stderr
    assert "--epochs 6" in r.stderr and "--lr 2e-07" in r.stderr
