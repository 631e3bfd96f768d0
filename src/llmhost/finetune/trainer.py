"""The LoRA training loop: deterministic data order per epoch, gradient accumulation, linear
warm-up and decay, atomic checkpoints, and a resume that continues with the same step, schedule,
data order and random state as if the run had never stopped."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmhost.config import llmhost_home
from llmhost.engine.ref import ModelRef
from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.finetune import checkpoints
from llmhost.finetune.data import IGNORE, Preflight, Tokenized, read_jsonl, tokenize
from llmhost.finetune.dist import Dist
from llmhost.finetune.settings import FinetuneSettings
from llmhost.store.local import Store, StoredModel
from llmhost.store.names import check_name, folder_name


class Progress(Protocol):
    def preflight(self, train: Preflight, evaluation: Preflight | None) -> None: ...
    def start(self, total_steps: int, first_step: int, targets: list[str], trainable: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, examples_per_s: float) -> None: ...
    def evaluated(self, epoch: int, loss: float) -> None: ...
    def checkpoint(self, step: int) -> None: ...


@dataclass
class Summary:
    name: str
    steps: int
    resumed_from: int
    train_loss: float
    eval_losses: list[float] = field(default_factory=list)
    examples_per_s: float = 0.0
    seconds: float = 0.0
    examples: int = 0


@dataclass
class Plan:
    base_ref: str
    base_path: Path
    settings: FinetuneSettings
    train: list[Tokenized]
    evaluation: list[Tokenized]
    run_dir: Path
    pad_id: int
    world: int = 1
    """Processes training together (data parallel); each takes its share of every epoch."""

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.train) / self.world) / self.settings.batch_size)

    @property
    def total_micro(self) -> int:
        return math.ceil(self.settings.epochs * self.batches_per_epoch)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_micro / self.settings.grad_accum)


def prepare(base: ModelRef, s: FinetuneSettings, progress: Progress, dist: Dist | None = None) -> Plan:
    """Everything before the model loads: names, data preflight, tokenization, the run folder."""
    from transformers import AutoTokenizer

    if base.is_adapter:
        raise InvalidRequestError(
            f"{base.name} is a LoRA adapter: fine-tune its base, or `llmhost merge` it first and "
            "fine-tune that"
        )
    check_name(s.name)
    if Store().get(s.name) and not s.overwrite:
        raise InvalidRequestError(
            f"the store already has {s.name!r}: pick another --name, or pass --overwrite"
        )
    train = read_jsonl(s.data)
    evaluation = read_jsonl(s.eval) if s.eval else None
    train.check(s.strict)
    if evaluation:
        evaluation.check(s.strict)
    base_ref = base.key
    base_path = base.hf_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"the base model {base_ref} has no chat template to format the data with")
    train_tok = tokenize(train, tokenizer, s.max_length)
    eval_tok = tokenize(evaluation, tokenizer, s.max_length) if evaluation else []
    progress.preflight(train, evaluation)
    train.check(s.strict)
    if evaluation:
        evaluation.check(s.strict)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run_dir = llmhost_home() / "finetune" / folder_name(s.name)
    dist = dist or Dist()
    plan = Plan(base_ref, base_path, s, train_tok, eval_tok, run_dir, int(pad or 0), dist.world)
    if dist.is_main:
        _claim_run(plan, _data_sha(s))
    dist.barrier()
    return plan


def _data_sha(s: FinetuneSettings) -> str:
    digest = hashlib.sha256(Path(s.data).read_bytes())
    if s.eval:
        digest.update(Path(s.eval).read_bytes())
    return digest.hexdigest()


def _claim_run(plan: Plan, data_sha: str) -> None:
    """A rerun with the same base, data and options continues; a different one needs --overwrite."""
    s = plan.settings
    fingerprint = s.fingerprint(plan.base_ref, data_sha)
    meta = plan.run_dir / "run.json"
    if meta.exists():
        old = json.loads(meta.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fingerprint and not s.overwrite:
            return
        if not s.overwrite:
            raise InvalidRequestError(
                f"a fine-tuning run named {s.name!r} with other data or options exists in {plan.run_dir}: "
                "rerun it with the same options to resume, or pass --overwrite to start over"
            )
        shutil.rmtree(plan.run_dir)
    elif s.resume:
        raise InvalidRequestError(f"there is no run named {s.name!r} to resume; drop --resume to start one")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    meta.write_text(
        json.dumps({"fingerprint": fingerprint, "base": plan.base_ref, "settings": s.model_dump(mode="json")})
    )


def load_model(plan: Plan) -> tuple[Any, list[str]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmhost.hardware import pick_device

    s = plan.settings
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if s.qlora:
        kwargs.update(_qlora_kwargs(cuda))
    else:
        bf16 = cuda and torch.cuda.is_bf16_supported()
        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float32
        if cuda:
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(plan.base_path), **kwargs)
    if not cuda and not s.qlora and pick_device("auto") == "mps":  # Apple silicon: float32 on its GPU
        model.to("mps")
    if s.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    targets = list(s.target_modules) or linear_layer_names(model)
    torch.manual_seed(s.seed)  # the LoRA initialisation is part of the seeded run
    config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        return get_peft_model(model, config), targets
    except ValueError as err:
        raise InvalidRequestError(f"--target-modules: {err}") from None


def _qlora_kwargs(cuda: bool) -> dict[str, Any]:
    import importlib.util

    if not cuda or importlib.util.find_spec("bitsandbytes") is None:
        raise LlmhostError(
            "--qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes); "
            "on this machine train without --qlora"
        )
    import torch
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    return {"quantization_config": quant, "device_map": {"": 0}}


def linear_layer_names(model: Any) -> list[str]:
    """The names of the linear layers inside the transformer blocks (q/k/v/o, MLP, ...), found in
    the model itself; the output head and embeddings are left alone."""
    import torch

    names = set()
    for full, module in model.named_modules():
        # inside a block: its path runs through a layer list index (model.layers.3.self_attn.q_proj)
        if isinstance(module, torch.nn.Linear) and any(part.isdigit() for part in full.split(".")):
            names.add(full.rsplit(".", 1)[-1])
    if not names:
        raise InvalidRequestError("found no linear layers in the model's blocks: pass --target-modules")
    return sorted(names)


def batches(plan: Plan, epoch: int, device: Any, dist: Dist) -> list[dict[str, Any]]:
    """The epoch's micro-batches in a seeded order, right-padded, pad tokens without loss."""
    import torch

    gen = torch.Generator().manual_seed(plan.settings.seed + epoch)
    order = dist.shard(torch.randperm(len(plan.train), generator=gen).tolist())
    bs = plan.settings.batch_size
    return [
        _collate([plan.train[i] for i in order[k : k + bs]], plan.pad_id, device)
        for k in range(0, len(order), bs)
    ]


def _collate(items: list[Tokenized], pad: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, t in enumerate(items):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def evaluate(model: Any, plan: Plan, device: Any) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(plan.evaluation), plan.settings.batch_size):
            batch = _collate(plan.evaluation[k : k + plan.settings.batch_size], plan.pad_id, device)
            total += float(model(**batch, use_cache=False).loss) * len(batch["input_ids"])
            count += len(batch["input_ids"])
    model.train()
    return total / max(count, 1)


def train(plan: Plan, progress: Progress, dist: Dist | None = None) -> tuple[Any, Summary]:
    """Run (or continue) the loop; returns the trained model and a summary."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    s = plan.settings
    dist = dist or Dist()
    model, targets = load_model(plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(s.warmup * plan.total_steps), plan.total_steps)
    state: dict[str, Any] = {"step": 0, "micro": 0, "losses": [], "eval_losses": []}
    last = checkpoints.latest(plan.run_dir / "checkpoints")
    if last is not None:
        state = checkpoints.load(last, model, optimizer, scheduler, dist.rank)
    model, optimizer = dist.wrap(model, optimizer)
    device = next(model.parameters()).device
    summary = Summary(s.name, plan.total_steps, state["step"], float("nan"), examples=len(plan.train))
    progress.start(plan.total_steps, state["step"], targets, sum(p.numel() for p in params))
    model.train()
    started, seen, running = time.perf_counter(), 0, []
    current: tuple[int, list[dict[str, Any]]] = (-1, [])
    while state["micro"] < plan.total_micro:
        epoch, index = divmod(state["micro"], plan.batches_per_epoch)
        if current[0] != epoch:
            current = (epoch, batches(plan, epoch, device, dist))
        batch = current[1][index]
        loss = model(**batch, use_cache=False).loss  # a training pass needs no KV cache
        (loss / s.grad_accum).backward()
        running.append(loss.detach().item())
        seen += len(batch["input_ids"])
        state["micro"] += 1
        if state["micro"] % plan.batches_per_epoch == 0 and plan.evaluation:
            state["eval_losses"].append(evaluate(model, plan, device))
            progress.evaluated(epoch + 1, state["eval_losses"][-1])
        if state["micro"] % s.grad_accum and state["micro"] < plan.total_micro:
            continue
        _step(params, optimizer, scheduler)
        state["step"] += 1
        state["losses"].append(sum(running) / len(running))
        running = []
        progress.step(
            state["step"],
            state["losses"][-1],
            scheduler.get_last_lr()[0],
            seen / (time.perf_counter() - started),
        )
        if state["step"] % s.save_steps == 0 and state["micro"] < plan.total_micro:
            checkpoints.save(
                plan.run_dir / "checkpoints",
                state["step"],
                dist.unwrap(model),
                optimizer,
                scheduler,
                state,
                dist,
            )
            progress.checkpoint(state["step"])
    summary.seconds = time.perf_counter() - started
    summary.examples_per_s = seen / summary.seconds if summary.seconds > 0 else 0.0
    summary.train_loss = state["losses"][-1] if state["losses"] else float("nan")
    summary.eval_losses = state["eval_losses"]
    return dist.unwrap(model), summary


#: Final train loss above which a run has likely not learned its data: small data sets (facts, a
#: style, a persona) are meant to be learned nearly by heart; large ones end higher by nature.
HIGH_LOSS = {200: 0.3, None: 1.5}


def loss_warning(summary: Summary, settings: FinetuneSettings) -> str | None:
    """Plain words for a run that ended with its loss still high, and what to change."""
    limit = HIGH_LOSS[200] if summary.examples <= 200 else HIGH_LOSS[None]
    if not summary.train_loss > limit:  # NaN counts as high
        return None
    return (
        f"the final train loss {summary.train_loss:.2f} is still high for {summary.examples} examples: "
        f"the model has probably not learned them. Train longer (--epochs {settings.epochs * 2:g}) or "
        f"faster (--lr {settings.lr * 2:g}), then compare its answers (add --overwrite to reuse the name)"
    )


def _step(params: list[Any], optimizer: Any, scheduler: Any) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def register(model: Any, plan: Plan, summary: Summary) -> StoredModel:
    """Put the adapter in the store as NAME: a reference to the base plus the LoRA weights."""
    s = plan.settings
    with Store().write(s.name) as w:
        model.save_pretrained(str(w.staging), safe_serialization=True)
        (w.staging / "README.md").unlink(missing_ok=True)
        stored = w.commit(
            "lora",
            "finetune",
            extra={
                "base": plan.base_ref,
                "settings": s.model_dump(mode="json"),
                "train_loss": summary.train_loss,
                "eval_losses": summary.eval_losses,
                "steps": summary.steps,
            },
        )
    shutil.rmtree(plan.run_dir, ignore_errors=True)  # the checkpoints served their purpose
    return stored
