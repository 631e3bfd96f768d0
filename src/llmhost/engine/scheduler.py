"""Many requests, one model: continuous batching on one inference thread.

The thread owns the model. Requests join between decoding steps (each is prefilled alone, then
merged into the running batch), every step advances all running sequences in one forward pass,
and finished or cancelled ones leave at once. Callers get a blocking iterator or, from asyncio,
an async iterator fed with `loop.call_soon_threadsafe`, so an event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmhost.engine.chunks import Chunk
from llmhost.engine.running import BatchRunner, Request
from llmhost.engine.sequence import SequenceState
from llmhost.engine.speculation import TO_DRAFT, Drafter, Lookup, Mode, plan
from llmhost.errors import LlmhostError

log = logging.getLogger(__name__)

#: Seconds between two wake-ups of an event loop while a stream's chunks keep coming: each
#: wake-up is a syscall, and the loop's thread then takes a core from the model's threads
#: (measured: ≈4% of single-stream decode on 2 cores with one per token). A reply's first
#: visible chunk and its last go at once; a reader sees the rest at most this late (a page
#: renders every 50-100 ms).
STREAM_PACE_S = 0.02

# Inference threads are stopped before the interpreter shuts down: a daemon thread still inside
# torch at finalization aborts the process ("terminate called without an active exception").
_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_live):
        scheduler.close()


class QueueFullError(LlmhostError):
    status = 503
    kind = "server_busy"


class Scheduler:
    def __init__(self, runner: BatchRunner, max_queue: int = 64, speculative: Mode = "auto") -> None:
        self.runner = runner
        self.max_queue = max_queue
        #: The default speculation (`--speculative`), used where the runner can check proposals.
        self.speculative: Mode = speculative if hasattr(runner, "verify") else "off"
        self._pending: deque[Request] = deque()
        self._active: list[Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._admitting = 0  # a request taken from the line and being prefilled (holds a place)
        self._prefilling: Request | None = None  # that request, while chunks of its prompt remain
        self._tasks: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
            weakref.WeakKeyDictionary()
        )
        self._deferred: set[_Mailbox] = set()  # holding chunks for a later wake-up (`_pace`)
        #: Most requests ever decoded together in one step (a gauge for tests and metrics).
        self.peak_batch = 0
        _live.add(self)

    # -- what callers see ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active) + self._admitting

    def submit(
        self,
        prompt_ids: list[int],
        seq: SequenceState,
        cancel: threading.Event | None = None,
        adapter: str | None = None,
    ) -> Iterator[Chunk]:
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        req = self._enqueue(prompt_ids, seq, q.put, cancel, adapter)
        return _iterate(req, q.get)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the inference thread between two steps and return its result: the way
        to change the model (add or remove a LoRA adapter) while requests decode."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise LlmhostError("the model was unloaded")
            self._tasks.append((fn, future))
            self._start()
            self._cv.notify()
        return future.result()

    def submit_async(
        self,
        prompt_ids: list[int],
        seq: SequenceState,
        loop: asyncio.AbstractEventLoop,
        cancel: threading.Event | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Chunk]:
        q: asyncio.Queue[object] = asyncio.Queue()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        req = self._enqueue(prompt_ids, seq, _Sink(mailbox, q, self._deferred), cancel, adapter)
        return _aiterate(req, q.get)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if (self._thread is None or not self._thread.is_alive()) and hasattr(self.runner, "close"):
            self.runner.close()  # native memory (llama.cpp's context), once nothing decodes

    def _enqueue(
        self,
        prompt_ids: list[int],
        seq: SequenceState,
        deliver: Callable[[object], None],
        cancel: threading.Event | None,
        adapter: str | None = None,
    ) -> Request:
        import torch

        params = seq.params
        req = Request(prompt_ids, seq, deliver, cancel or threading.Event(), adapter=adapter)
        if params.seed is not None and not params.greedy:
            req.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            req.seen = list(prompt_ids)
        with self._cv:
            if self._closed:
                raise QueueFullError("the model is shutting down; try again later")
            if self._waiting(also=1) > self.max_queue:
                self._purge_cancelled()
            if self._waiting(also=1) > self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self._pending.append(req)
            self._start()
            self._cv.notify()
        return req

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmhost-inference", daemon=True)
            self._thread.start()

    def _waiting(self, also: int = 0) -> int:
        """Requests that will wait for a slot, with `also` more: those pending beyond the batch's
        free places (a request to an idle engine waits for nothing, even with --max-queue 0)."""
        free = max(0, self.runner.max_batch - len(self._active) - self._admitting)
        return max(0, len(self._pending) + also - free)

    def _purge_cancelled(self) -> None:
        """Free the queue slots of callers that gave up while waiting (called under the lock)."""
        gone = [r for r in self._pending if r.cancel.is_set()]
        for req in gone:
            self._pending.remove(req)
            req.deliver(req.seq.finish("cancelled"))

    # -- the inference thread -----------------------------------------------------------

    def _run(self) -> None:
        import torch

        # torch's intra-op threads are set per thread (a new thread starts with the count last
        # set anywhere), so each runner's thread says its own
        threads = getattr(self.runner, "torch_threads", None)
        if threads:
            torch.set_num_threads(threads)
        # this thread only ever runs the model: no autograd, and tensors stay inference tensors
        with torch.inference_mode():
            self._serve()

    def _arrived(self) -> bool:
        """Whether work came in (read without the lock: a runner polls it from native code)."""
        return bool(self._pending or self._tasks or self._closed)

    def _busy(self) -> bool:
        return bool(self._pending or self._active or self._prefilling or self._tasks or self._closed)

    def _serve(self) -> None:
        # a runner may have work for idle times (llama.cpp re-evaluates finished replies so
        # that the next turn reuses them): done a piece at a time, only while nothing waits
        idle_work = getattr(self.runner, "idle_work", None)
        more_idle = False
        while True:
            self._pace()
            with self._cv:
                if not (more_idle and idle_work):
                    self._cv.wait_for(self._busy)
                if self._closed:
                    self._fail_all(LlmhostError("the model was unloaded"))
                    return
                self._purge_cancelled()  # callers who gave up while waiting leave the line now
                tasks, self._tasks = list(self._tasks), deque()
                busy = self._busy() or bool(tasks)
            for fn, future in tasks:
                try:
                    future.set_result(fn())
                except Exception as err:
                    future.set_exception(err)
            if not busy and idle_work:
                try:
                    more_idle = idle_work(self._arrived)
                except Exception:  # the runner dropped what failed; requests are not affected
                    log.exception("idle work failed")
                    more_idle = False
                continue
            more_idle = True  # requests may have finished: see if the runner has work
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as err:  # a failed forward pass must not kill the thread
                log.exception("inference step failed")
                self._fail_all(err)

    def _admit(self) -> None:
        """Take waiting requests into the batch. A runner that prefills in chunks
        (`prefill_chunk`) evaluates one chunk of a long prompt per loop while others are running,
        so their streams pause for a chunk, not for the whole prompt."""
        if self._prefilling is not None and not self._prefill():
            return
        while len(self._active) < self.runner.max_batch:
            with self._cv:
                if not self._pending:
                    return
                req = self._pending.popleft()
                self._admitting = 1
            if req.cancel.is_set():
                req.deliver(req.seq.finish("cancelled"))
                self._admitting = 0
                continue
            if self._active and not self.runner.has_room(req):
                with self._cv:
                    self._pending.appendleft(req)  # first in line once running requests finish
                    self._admitting = 0
                return
            self._prefilling = req
            if not self._prefill():
                return  # a chunk done: the running requests step before the next one

    def _prefill(self) -> bool:
        """Go on with the request being prefilled; False while chunks of its prompt remain."""
        req = self._prefilling
        assert req is not None
        chunked = getattr(self.runner, "prefill_chunk", None)
        try:
            while True:
                if req.cancel.is_set():
                    self.runner.abort_prefill()  # type: ignore[attr-defined]
                    req.deliver(req.seq.finish("cancelled"))
                    return self._admitted()
                logits = chunked(req) if chunked else self.runner.prefill(req)
                if logits is not None:
                    break
                if self._active:
                    return False
            req.pick(logits, self._seen(req))
        except Exception as err:
            log.exception("prefill failed")
            req.deliver(err)
            return self._admitted()
        if not req.seq.finished:
            req.drafter = self._drafter(req)
            self._active.append(req)
            self.runner.commit_prefill()
        return self._admitted()

    def _admitted(self) -> bool:
        self._prefilling, self._admitting = None, 0
        return True

    def _step(self) -> None:
        for req in self._active:
            if req.cancel.is_set():
                req.deliver(req.seq.finish("cancelled"))
        self._prune()
        if not self._active:
            return
        self.peak_batch = max(self.peak_batch, len(self._active))
        drafts = self._drafts()
        if drafts is None:
            logits = self.runner.step(self._active)
        else:
            logits = self.runner.verify(self._active, drafts)  # type: ignore[attr-defined]
        runner: Any = self.runner
        for row, req in enumerate(self._active):
            rejected = None
            try:
                if drafts is None:
                    req.pick(logits[row], self._seen(req))
                else:
                    rejected = req.pick_verified(logits[row], drafts[row], lambda r=req: self._seen(r))
                    runner.rollback(row, rejected)
            except Exception as err:  # this request's own failure (its grammar, say): only it ends
                log.exception("sampling failed")
                if drafts is not None and rejected is None:  # its cells end at its last token again
                    runner.rollback(row, len(drafts[row]))
                req.seq.finished = True
                req.deliver(err)
        self._prune()

    def _drafter(self, req: Request) -> Drafter | None:
        """A request's speculation, as it asks (else `speculative`): `auto` where the runner
        checks proposals exactly (greedy replies are then the same tokens), `ngram` always."""
        mode = req.seq.params.speculative or self.speculative
        runner: Any = self.runner
        if getattr(runner, "batch_cost", None) is None:  # a hint about speed: this runner decodes
            return None  # token by token (it cannot check proposals, or did not measure them)
        # auto: exact checks only, and on the plain model (an adapter's own matmuls were not measured)
        if mode == "off" or (mode == "auto" and not (runner.verifies_exactly and req.adapter is None)):
            return None
        by_model = mode == "draft" and getattr(runner, "draft", None) is not None
        lookup = None if by_model else Lookup([*req.prompt_ids, *req.seq.generated])
        return Drafter(lookup, forced=mode != "auto")

    def _drafts(self) -> list[list[int]] | None:
        """This step's proposals, one per row (`speculation.plan`); None when none is made."""
        drafters = [req.drafter for req in self._active]
        if not any(drafters):
            return None
        for req, drafter in zip(self._active, drafters, strict=True):
            if drafter is not None:
                drafter.left = req.seq.params.max_new_tokens - len(req.seq.generated)
        runner: Any = self.runner
        model = getattr(runner, "draft", None)
        drafts = plan(drafters, runner.batch_cost, runner.max_positions, model and model.cost)
        wanted = [row for row, d in enumerate(drafts) if d and d[0] == TO_DRAFT]
        if wanted:  # the draft model's turn: as many tokens as the plan gave each row
            made = runner.draft_for([(r, self._active[r], len(drafts[r])) for r in wanted])
            for row, tokens in zip(wanted, made, strict=True):
                drafts[row] = tokens
        return drafts if any(drafts) else None

    def _prune(self) -> None:
        keep = [i for i, r in enumerate(self._active) if not r.seq.finished]
        if len(keep) != len(self._active):
            self.runner.drop(keep)
            self._active = [self._active[i] for i in keep]

    def _seen(self, req: Request) -> Any:
        if not req.seen:
            return None
        import torch

        return torch.tensor(req.seen, device=self.runner.device)

    def _pace(self) -> None:
        """Send held chunks whose time has come; all of them when the next thing this thread
        does is not a plain decode step (a prompt chunk, a task, idle work, waiting)."""
        if self._deferred:
            now = not self._active or bool(self._pending or self._prefilling or self._tasks)
            self._deferred -= {box for box in list(self._deferred) if box.due(now)}

    def _fail_all(self, err: Exception) -> None:
        with self._cv:
            doomed = self._active + list(self._pending)
            prefilling, self._prefilling, self._admitting = self._prefilling, None, 0
            if prefilling is not None:
                doomed.append(prefilling)
            self._active, self._pending = [], deque()
            for _, future in self._tasks:
                future.set_exception(err)
            self._tasks.clear()
        if prefilling is not None and hasattr(self.runner, "abort_prefill"):
            self.runner.abort_prefill()
        self.runner.drop([])
        for req in doomed:
            req.deliver(err)


def _iterate(req: Request, get: Callable[[], object]) -> Iterator[Chunk]:
    try:
        while True:
            item = get()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            yield item
            if item.finish_reason is not None:
                return
    finally:
        req.cancel.set()  # a caller that stops reading frees the slot within a step


class _Mailbox:
    """Chunks on their way to one event loop's request queues. Waking a loop from another thread
    is a syscall, and the loop's thread then competes with the model's for the CPU: one wake-up
    carries everything posted until the loop runs (a whole step's rows), and while chunks keep
    coming, wake-ups are STREAM_PACE_S apart unless one is urgent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue[object], object]] = []
        self.lock = threading.Lock()
        self.waking = False  # a wake-up is on its way
        self.woke = 0.0

    def post(self, q: asyncio.Queue[object], item: object, urgent: bool = True) -> bool:
        """Queue `item` for `q`; False when it waits for `due` (not urgent, and the loop was
        woken less than STREAM_PACE_S ago)."""
        with self.lock:
            self.items.append((q, item))
        return self.due(urgent)

    def due(self, now: bool) -> bool:
        """Wake the loop for held items if their time has come (`now`: at once); False while
        they still wait."""
        with self.lock:
            if self.waking or not self.items:
                return True
            if not now and time.monotonic() - self.woke < STREAM_PACE_S:
                return False
            self.waking = True
        self._wake()
        return True

    def _wake(self) -> None:
        self.woke = time.monotonic()
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.waking = self.items, [], False
        for q, item in items:
            q.put_nowait(item)


@dataclass(eq=False)
class _Sink:
    """Where one request's chunks go from the inference thread: its queue, through the loop's
    mailbox. Urgent (sent at once): every chunk until one shows something (the first token a
    reader sees), the last one, and errors; the others may wait for the mailbox's pace."""

    mailbox: _Mailbox
    q: asyncio.Queue[object]
    deferred: set[_Mailbox]  # the scheduler's: mailboxes holding chunks (inference thread only)
    shown: bool = False

    def __call__(self, item: object) -> None:
        urgent = not self.shown or not isinstance(item, Chunk) or item.finish_reason is not None
        if isinstance(item, Chunk) and (item.text or item.reasoning or item.tool_calls):
            self.shown = True
        if not self.mailbox.post(self.q, item, urgent):
            self.deferred.add(self.mailbox)


async def _aiterate(req: Request, get: Callable[[], Any]) -> AsyncIterator[Chunk]:
    try:
        while True:
            item = await get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        req.cancel.set()
