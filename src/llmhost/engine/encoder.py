"""Models that read text and answer numbers (embedding models, rerankers) on transformers: one
forward pass per batch, no generation. `Batcher` puts the rows of concurrent requests into the
same batches, so 32 clients each sending one text cost about one forward pass, not 32.

How a batch forms: a worker thread takes the rows waiting when it is free, up to a token budget,
so a lone request starts at once (no collection delay on an idle server). Under load it first
waits, briefly, until the requests in flight wait: clients answered together come back
together, spread over their HTTP round trips, and a batch taken at the first arrival runs a
few rows at a time (on 2 cores at 32 clients a third of the batches held 1 to 3 rows, and one
short text costs 4x per row what 16 do). On a CPU it waits for all of them: the event loop's
HTTP work for requests arriving during a forward pass takes a core from the pass's threads,
which then stall at each other's barriers (on 2 cores 16% more time per row; measured against
running one half while the other half's answers go out, 0.86x in-process against 0.79x at 32
clients). A GPU's pass leaves the cores to the event loop, so there it waits for half of them
(when half makes `SPLIT_TOKENS` or more) and one half runs while the other half's HTTP round
trips happen (not measured: these machines have no GPU). Rows are sorted by length and
padded in buckets of `BUCKET` rows of similar length, so padding stays short.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.base import Engine
from llmhost.engine.chunks import Chunk
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError, LlmhostError

#: One tokenized input: input_ids plus whatever else the model reads (token_type_ids).
Row = dict[str, list[int]]
#: Rows padded together in one forward pass.
BUCKET = 32
#: Tokens (before padding) one batch may hold; a request larger than this spans batches.
BATCH_TOKENS = 16384
#: The longest a free worker waits under load for the requests in flight to come back.
MAX_WAIT = 0.05
#: Fewer tokens than this in a batch run well below a forward pass's full speed on a CPU.
SPLIT_TOKENS = 256


@dataclass(eq=False)
class _Job:
    """One request's rows: tokenized by the worker, answered when its last row is done."""

    prepare: Callable[[], list[Row]]
    future: Future[list[Any]] = field(default_factory=Future)
    rows: list[Row] | None = None
    outputs: list[Any] = field(default_factory=list)
    taken: int = 0  # rows handed to batches so far
    left: int = 0  # rows whose output has not come back yet

    def start(self) -> None:
        self.rows = self.prepare()
        self.outputs, self.left = [None] * len(self.rows), len(self.rows)
        if not self.rows:
            self.future.set_result([])

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class Batcher:
    """Runs `run(rows) -> outputs` over the rows of every waiting request, one batch at a time,
    on its own thread; `submit` returns a Future of one request's outputs, in its order."""

    def __init__(
        self,
        run: Callable[[list[Row]], list[Any]],
        name: str,
        budget: int = BATCH_TOKENS,
        overlap: bool = False,
    ) -> None:
        # overlap: `run` leaves the CPU to the event loop (a GPU's forward pass), so half the
        # requests in flight may run while the other half's round trips happen
        self.run, self.name, self.budget, self.overlap = run, name, budget, overlap
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run and the rows in them (the tests read them to see batching)
        self.rows = 0
        # under load, what the next batch waits for: the requests in flight as the last two
        # batches ended (running or waiting), the tokens per request, the last batch's seconds
        self._load = (0, 0)
        self._tokens_per_job = 0.0
        self._took = 0.0

    def submit(self, prepare: Callable[[], list[Row]]) -> Future[list[Any]]:
        job = _Job(prepare)
        with self._wake:
            if self._closed:
                raise LlmhostError(f"{self.name} is unloaded")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"batch:{self.name}", daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                idle = time.monotonic()
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if time.monotonic() - idle > MAX_WAIT:
                    self._load = (0, 0)  # idle a while: the last batches' clients are not coming back
                if self._closed:
                    for job in self._jobs:
                        job.fail(LlmhostError(f"{self.name} was unloaded before the request ran"))
                    return
            self._gather()
            taken = self._take()
            if not taken:
                continue
            started = time.monotonic()
            try:
                outputs = self.run([job.rows[i] for job, i in taken])  # type: ignore[index]
            except Exception as err:  # the batch's requests fail; the worker goes on
                for job in {job for job, _ in taken}:
                    job.fail(err)
                continue
            finally:
                self._note(taken, time.monotonic() - started)
            self.batches += 1
            self.rows += len(taken)
            for (job, i), out in zip(taken, outputs, strict=True):
                job.outputs[i] = out
                job.left -= 1
                if job.left == 0 and not job.future.done():
                    job.future.set_result(job.outputs)

    def _note(self, taken: list[tuple[_Job, int]], seconds: float) -> None:
        jobs = {id(job) for job, _ in taken}
        with self._wake:
            in_flight = len(jobs | {id(job) for job in self._jobs})
        self._load = (self._load[1], in_flight)
        self._tokens_per_job = sum(len(job.rows[i]["input_ids"]) for job, i in taken) / len(jobs)  # type: ignore[index]
        self._took = seconds

    def _gather(self) -> None:
        """Under load, wait until the requests in flight wait (with `overlap`, half of them where
        half makes a batch of SPLIT_TOKENS): up to half the last batch's time (a slower model
        affords a longer wait), at most MAX_WAIT. On an idle server this returns at once."""
        load = max(self._load)
        half = (load + 1) // 2
        want = half if self.overlap and half * self._tokens_per_job >= SPLIT_TOKENS else load
        deadline = time.monotonic() + min(MAX_WAIT, self._took / 2)
        with self._wake:
            while len(self._jobs) < want and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    def _take(self) -> list[tuple[_Job, int]]:
        """The next batch: rows of the waiting requests in arrival order, up to the budget (a
        request's first rows may go now and the rest in the next batch)."""
        taken: list[tuple[_Job, int]] = []
        tokens = 0
        with self._wake:
            jobs = list(self._jobs)
        for job in jobs:
            if job.rows is None:
                try:
                    job.start()  # tokenizing here keeps it off the event loop
                except Exception as err:
                    job.fail(err)
            if job.future.done():  # failed (here or in an earlier batch), or nothing to run
                self._drop(job)
                continue
            rows = job.rows
            assert rows is not None
            while job.taken < len(rows):
                n = len(rows[job.taken]["input_ids"])
                if taken and tokens + n > self.budget:
                    return taken
                taken.append((job, job.taken))
                job.taken += 1
                tokens += n
            self._drop(job)
        return taken

    def _drop(self, job: _Job) -> None:
        with self._wake:
            if job in self._jobs:
                self._jobs.remove(job)


class EncoderEngine(Engine):
    """A transformers model that answers numbers: the tokenizer, the model and its batcher; it
    refuses chat with a 400 that names the endpoint it serves instead."""

    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, context_length: int) -> None:
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.placement = str(device)
        self.context_length = context_length
        self.batcher = Batcher(self._run, name, overlap=not str(device).startswith("cpu"))

    @staticmethod
    def load_parts(folder: Path, settings: LoadSettings, auto: Any) -> tuple[Any, Any, str]:
        """Tokenizer, model (from the `auto` class) and device, safetensors only."""
        import torch
        from transformers import AutoTokenizer

        from llmhost.engine.backends.hf_folder import load_errors
        from llmhost.hardware import pick_device, pick_dtype

        device = pick_device(settings.device)
        dtype = getattr(torch, pick_dtype(settings.dtype, device))
        remote = settings.trust_remote_code
        with load_errors(folder, None, remote):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
            model = auto.from_pretrained(
                str(folder), dtype=dtype, trust_remote_code=remote, use_safetensors=True
            )
        model.to(device).eval()
        return tokenizer, model, device

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        raise self.not_chat()

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        raise self.not_chat()

    def _submit(self, prepare: Callable[[], list[Row]]) -> list[Any]:
        return self.batcher.submit(prepare).result()

    async def _asubmit(self, prepare: Callable[[], list[Row]]) -> list[Any]:
        return await asyncio.wrap_future(self.batcher.submit(prepare))

    def _run(self, rows: list[Row]) -> list[Any]:
        """Outputs for rows in their order: sorted by length, padded and run in buckets."""
        import torch

        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        outputs: list[Any] = [None] * len(rows)
        with torch.inference_mode():
            for start in range(0, len(order), BUCKET):
                bucket = order[start : start + BUCKET]
                padded = self.tokenizer.pad(
                    [rows[i] for i in bucket], padding_side="right", return_tensors="pt"
                )
                padded = {k: v.to(self.device) for k, v in padded.items()}
                for i, out in zip(bucket, self._forward(padded), strict=True):
                    outputs[i] = out
        return outputs

    def _forward(self, batch: dict[str, Any]) -> list[Any]:
        """One output per row of a right-padded batch."""
        raise NotImplementedError

    def close(self) -> None:
        self.batcher.close()


def last_index(mask: Any) -> Any:
    """Each row's last real position in an attention mask, whichever side it is padded on."""
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


def fitted(ids: list[int], room: int, truncate: bool, index: int, name: str) -> list[int]:
    """An input's ids cut to `room` tokens, or with `truncate` off a 400 that gives the numbers."""
    if len(ids) <= room or truncate:
        return ids[:room]
    raise InvalidRequestError(
        f"input[{index}] is {len(ids)} tokens and {name} reads at most {room}: shorten it, or leave "
        "truncate on (the model then reads its first tokens, as sentence-transformers does)",
        f"input.{index}",
    )
