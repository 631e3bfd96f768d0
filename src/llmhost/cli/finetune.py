"""`llmhost finetune` and `llmhost merge`: progress and summaries for the training loop."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llmhost.cli.common import console
from llmhost.finetune.data import Preflight
from llmhost.finetune.settings import FinetuneSettings


class RichTrainProgress:
    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[eps]:.1f} ex/s"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def preflight(self, train: Preflight, evaluation: Preflight | None) -> None:
        for label, pre in (("train", train), ("eval", evaluation)):
            if pre is None:
                continue
            formats = ", ".join(f"{n} {f}" for f, n in _formats(pre).items())
            console.print(f"{label}: {len(pre.examples)} examples ({formats}) from {pre.path}")
            for line in pre.report():
                console.print(f"  [yellow]skipped[/yellow] {line}")

    def start(self, total_steps: int, first_step: int, targets: list[str], trainable: int) -> None:
        if first_step:
            console.print(f"resuming at step {first_step} of {total_steps} from the last complete checkpoint")
        console.print(
            f"LoRA on {', '.join(targets)}: {trainable:,} trainable parameters, {total_steps} steps"
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train", total=total_steps, completed=first_step, loss=0.0, lr=0.0, eps=0.0
        )

    def step(self, step: int, loss: float, lr: float, examples_per_s: float) -> None:
        self.bar.update(self.task, completed=step, loss=loss, lr=lr, eps=examples_per_s)

    def evaluated(self, epoch: int, loss: float) -> None:
        self.bar.console.print(f"epoch {epoch}: eval loss {loss:.4f}")

    def checkpoint(self, step: int) -> None:
        self.bar.console.print(f"checkpoint at step {step}", style="dim")

    def stop(self) -> None:
        self.bar.stop()


def _formats(pre: Preflight) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in pre.examples:
        counts[ex.format] = counts.get(ex.format, 0) + 1
    return counts


def run(base: str | None, settings: FinetuneSettings) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    from llmhost.engine.ref import resolve_ref
    from llmhost.finetune.dist import Dist
    from llmhost.finetune.trainer import loss_warning, prepare, register, train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # deprecation chatter between peft and transformers says nothing the user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")

    dist = Dist()  # several processes under torchrun / accelerate launch; else a no-op
    progress = RichTrainProgress() if dist.is_main else Quiet()
    plan = prepare(resolve_ref(base), settings, progress, dist)
    try:
        model, summary = train(plan, progress, dist)
    finally:
        progress.stop()
    if not dist.is_main:
        dist.barrier()
        return
    stored = register(model, plan, summary)
    dist.barrier()
    evals = ", ".join(f"{x:.4f}" for x in summary.eval_losses) or "-"
    procs = f" × {dist.world} processes" if dist.world > 1 else ""
    console.print(
        f"[green]✓[/green] {stored.name}: {summary.steps} steps on {summary.examples} examples in "
        f"{summary.seconds:.0f} s ({summary.examples_per_s:.1f} examples/s{procs}); final train loss "
        f"{summary.train_loss:.4f}; eval loss per epoch {evals}"
    )
    console.print(
        f"  use it: llmhost chat {stored.name}  |  llmhost serve {stored.name}  |  llmhost web {stored.name}"
    )
    if (warning := loss_warning(summary, settings)) is not None:
        console.print(f"[yellow]warning:[/yellow] {warning}")


class Quiet:
    """Progress for the other processes of a data-parallel run: the main one reports."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def run_merge(name: str, out: str, overwrite: bool) -> None:
    from llmhost.engine.ref import resolve_ref
    from llmhost.finetune.merge import merge

    adapter = resolve_ref(name)
    with console.status(f"Merging {name} into its base…"):
        stored = merge(adapter, out, overwrite)
    console.print(f"[green]✓[/green] {stored.name}: a standalone model in {stored.folder}")
