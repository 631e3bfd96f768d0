"""Fine-tuning speed: llmhost's training loop against a plain peft + transformers Trainer script
with the same model, data, LoRA settings and batch size, each run in its own process (so peak
memory is its own), alternating A/B for several rounds in one session.

    python bench/finetune.py [--rounds 2] [--examples 48]

Prints examples/s of the training loop (model loading excluded on both sides) and peak RSS, with
ratios against the Trainer baseline.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import isolated  # bench/isolated.py: the script's folder is on sys.path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "zorblax.jsonl"
SETTINGS = {"rank": 8, "alpha": 32.0, "dropout": 0.1, "lr": 2e-4, "batch_size": 4, "epochs": 1.0, "seed": 1}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_llmhost(data: Path) -> dict:
    from llmhost.finetune.settings import FinetuneSettings
    from llmhost.finetune.trainer import prepare, train

    class Quiet:
        def __getattr__(self, name):
            return lambda *a, **k: None

    s = FinetuneSettings(
        data=data, name="bench-llmhost", overwrite=True, save_steps=10**6, warmup=0.0, **SETTINGS
    )
    plan = prepare(None, s, Quiet())
    _, summary = train(plan, Quiet())
    return {"examples_per_s": summary.examples_per_s, "peak_rss_mib": peak_rss_mib()}


def run_trainer(data: Path) -> dict:
    """What the tutorials' recipe does: peft LoRA + transformers Trainer, replies-only labels."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from llmhost.engine.ref import resolve_ref
    from llmhost.finetune.data import encode, read_jsonl

    path = resolve_ref(None).hf_folder()
    tok = AutoTokenizer.from_pretrained(str(path))
    rows = [
        dict(zip(("input_ids", "labels"), encode(tok, ex.messages), strict=True))
        for ex in read_jsonl(data).examples
    ]
    for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(SETTINGS["seed"])
    config = LoraConfig(r=SETTINGS["rank"], lora_alpha=SETTINGS["alpha"], lora_dropout=SETTINGS["dropout"],
                        target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
            num_train_epochs=SETTINGS["epochs"], seed=SETTINGS["seed"], save_strategy="no", report_to=[],
            logging_steps=10**6, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"examples_per_s": len(rows) * SETTINGS["epochs"] / seconds, "peak_rss_mib": peak_rss_mib()}


def child(which: str, data: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    result = run_llmhost(data) if which == "llmhost" else run_trainer(data)
    isolated.report(result)


def spawn(which: str, data: Path, home: str) -> dict:
    return isolated.run(__file__, ["--child", which, "--data", str(data)], {"LLMHOST_HOME": home})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--child")
    ap.add_argument("--data", type=Path)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.data)
    lines = DATA.read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("\n".join(lines[i % len(lines)] for i in range(a.examples)) + "\n")
        home = os.environ.get("LLMHOST_HOME") or str(Path(tmp) / "home")
        results: dict[str, list[dict]] = {"trainer": [], "llmhost": []}
        for r in range(a.rounds):
            for which in ("trainer", "llmhost"):  # alternate, so drift hits both alike
                results[which].append(spawn(which, data, home))
                print(f"round {r + 1} {which}: {results[which][-1]}", file=sys.stderr)
    base_eps = statistics.median(x["examples_per_s"] for x in results["trainer"])
    base_rss = statistics.median(x["peak_rss_mib"] for x in results["trainer"])
    setup = f"{a.examples} examples, batch 4, 1 epoch, {a.rounds} rounds (median)"
    print(f"\nLoRA r=8 on the embedded model, {setup}")
    print(f"{'run':<28}{'examples/s':>12}{'ratio':>8}{'peak RSS MiB':>14}{'ratio':>8}")
    for which, label in (("trainer", "peft + Trainer (baseline)"), ("llmhost", "llmhost finetune")):
        eps = statistics.median(x["examples_per_s"] for x in results[which])
        rss = statistics.median(x["peak_rss_mib"] for x in results[which])
        print(f"{label:<28}{eps:>12.2f}{eps / base_eps:>8.2f}{rss:>14.0f}{rss / base_rss:>8.2f}")


if __name__ == "__main__":
    main()
