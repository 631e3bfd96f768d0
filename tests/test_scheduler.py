"""The scheduler's admission, cancellation and failure paths, driven by a fake `BatchRunner`
(no model): each row's next token is its last token + 1, so every reply is predictable."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from llmhost.engine.chunks import collect
from llmhost.engine.params import GenerationParams
from llmhost.engine.scheduler import QueueFullError, Scheduler
from llmhost.engine.sequence import SequenceState
from servers import wait_for

VOCAB = 64
EOS = 63


class Letters:
    """A decoder: token i is the letter chr(ord('a') + i % 26)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == EOS))


class FakeRunner:
    device = "cpu"

    def __init__(self, max_batch: int = 4, room: int = 10**9, step_delay: float = 0.0) -> None:
        self.max_batch = max_batch
        self.room = room  # tokens the "KV cache" holds
        self.step_delay = step_delay
        self.rows: list[int] = []  # reserved tokens per running row
        self.staged: int | None = None
        self.prefilled: list[list[int]] = []
        self.fail_prefill: set[int] = set()  # first prompt token that makes prefill fail
        self.fail_step = threading.Event()
        self.peak_rows = 0
        self.gate = threading.Event()
        self.gate.set()

    @staticmethod
    def _next(token: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[(token + 1) % VOCAB] = 1.0
        return logits

    def prefill(self, req) -> torch.Tensor:
        self.gate.wait(10)
        if req.prompt_ids[0] in self.fail_prefill:
            raise RuntimeError("prefill exploded")
        self.prefilled.append(list(req.prompt_ids))
        self.staged = len(req.prompt_ids) + req.seq.params.max_new_tokens
        return self._next(req.prompt_ids[-1])

    def commit_prefill(self) -> None:
        assert self.staged is not None
        self.rows.append(self.staged)
        self.staged = None
        self.peak_rows = max(self.peak_rows, len(self.rows))

    def step(self, reqs) -> torch.Tensor:
        self.gate.wait(10)
        time.sleep(self.step_delay)
        if self.fail_step.is_set():
            self.fail_step.clear()
            raise RuntimeError("step exploded")
        assert len(reqs) == len(self.rows)
        return torch.stack([self._next(r.last_token) for r in reqs])

    def drop(self, keep: list[int]) -> None:
        self.staged = None
        self.rows = [self.rows[i] for i in keep]

    def has_room(self, req) -> bool:
        return sum(self.rows) + len(req.prompt_ids) + req.seq.params.max_new_tokens <= self.room


def seq(prompt: list[int], n: int) -> tuple[list[int], SequenceState]:
    params = GenerationParams(temperature=0, max_new_tokens=n)
    return prompt, SequenceState(Letters(), params, len(prompt), {EOS}, time.perf_counter())


def expected(prompt: list[int], n: int) -> str:
    return Letters().decode([(prompt[-1] + 1 + i) % VOCAB for i in range(n)])


@pytest.fixture
def make():
    made: list[Scheduler] = []

    def factory(runner: FakeRunner, max_queue: int = 64) -> Scheduler:
        made.append(Scheduler(runner, max_queue))
        return made[-1]

    yield factory
    for s in made:
        s.close()


def test_admits_up_to_max_batch_and_every_reply_is_whole(make) -> None:
    runner = FakeRunner(max_batch=2, step_delay=0.002)
    scheduler = make(runner)
    prompts = [[i] for i in range(5)]
    streams = [scheduler.submit(*seq(p, 6)) for p in prompts]
    results = [collect(s) for s in streams]
    assert [r.text for r in results] == [expected(p, 6) for p in prompts]
    assert all(r.finish_reason == "length" for r in results)
    assert scheduler.peak_batch == 2 and runner.peak_rows == 2
    # the last chunk reaches its caller just before the thread prunes the batch
    assert wait_for(lambda: scheduler.running == scheduler.queued == 0, timeout=2)


def test_a_request_waits_while_the_cache_has_no_room(make) -> None:
    runner = FakeRunner(max_batch=4, room=25, step_delay=0.002)
    scheduler = make(runner)
    big = [scheduler.submit(*seq([1] * 5, 10)) for _ in range(2)]  # 15 tokens each: one fits
    results = [collect(s) for s in big]
    assert [r.text for r in results] == [expected([1], 10)] * 2
    assert runner.peak_rows == 1  # never two together in a cache of 25


def test_a_request_cancelled_while_queued_is_never_prefilled(make) -> None:
    runner = FakeRunner(max_batch=1)
    scheduler = make(runner)
    runner.gate.clear()  # hold the inference thread inside the first prefill
    first = scheduler.submit(*seq([1], 3))
    cancel = threading.Event()
    queued = scheduler.submit(*seq([2], 3), cancel)
    assert wait_for(lambda: scheduler.queued == 1)
    cancel.set()
    runner.gate.set()
    assert collect(queued).finish_reason == "cancelled"
    assert collect(first).text == expected([1], 3)
    assert [2] not in runner.prefilled


def test_cancelling_a_running_request_frees_its_row_within_a_step(make) -> None:
    runner = FakeRunner(max_batch=2, step_delay=0.005)
    scheduler = make(runner)
    cancel = threading.Event()
    doomed = scheduler.submit(*seq([1], 10_000), cancel)
    other = scheduler.submit(*seq([2], 40))
    next(doomed)
    assert wait_for(lambda: scheduler.running == 2)
    cancel.set()
    last = collect(doomed)
    assert last.finish_reason == "cancelled"
    assert wait_for(lambda: scheduler.running <= 1, timeout=1)
    assert collect(other).text == expected([2], 40)  # the other row was unaffected


def test_closing_the_iterator_cancels(make) -> None:
    runner = FakeRunner(max_batch=1, step_delay=0.005)
    scheduler = make(runner)
    stream = scheduler.submit(*seq([1], 10_000))
    next(stream)
    stream.close()
    assert wait_for(lambda: scheduler.running == 0, timeout=2)
    assert collect(scheduler.submit(*seq([3], 2))).text == expected([3], 2)


def test_a_failed_prefill_fails_that_request_only(make) -> None:
    runner = FakeRunner(max_batch=2)
    runner.fail_prefill.add(9)
    scheduler = make(runner)
    bad = scheduler.submit(*seq([9], 3))
    good = scheduler.submit(*seq([1], 3))
    with pytest.raises(RuntimeError, match="prefill exploded"):
        collect(bad)
    assert collect(good).text == expected([1], 3)


def test_a_failed_step_fails_the_batch_and_the_thread_serves_on(make) -> None:
    runner = FakeRunner(max_batch=2, step_delay=0.005)
    scheduler = make(runner)
    running = [scheduler.submit(*seq([i], 1000)) for i in (1, 2)]
    for s in running:
        next(s)
    runner.fail_step.set()
    for s in running:
        with pytest.raises(RuntimeError, match="step exploded"):
            collect(s)
    assert scheduler.running == 0 and runner.rows == []
    assert collect(scheduler.submit(*seq([5], 4))).text == expected([5], 4)


def test_a_full_queue_refuses_then_makes_room_for_callers_that_gave_up(make) -> None:
    runner = FakeRunner(max_batch=1)
    scheduler = make(runner, max_queue=2)
    runner.gate.clear()
    first = scheduler.submit(*seq([1], 2))
    assert wait_for(lambda: scheduler.queued == 0)  # taken by the thread, held in prefill
    cancel = threading.Event()
    waiting = [scheduler.submit(*seq([2], 2), cancel), scheduler.submit(*seq([3], 2))]
    with pytest.raises(QueueFullError):
        scheduler.submit(*seq([4], 2))
    cancel.set()  # a caller gave up: its place is free
    late = scheduler.submit(*seq([4], 2))
    runner.gate.set()
    assert collect(waiting[0]).finish_reason == "cancelled"
    assert [collect(s).text for s in (first, waiting[1], late)] == [expected([p], 2) for p in (1, 3, 4)]


def test_end_of_sequence_finishes_with_stop(make) -> None:
    scheduler = make(FakeRunner())
    result = collect(scheduler.submit(*seq([EOS - 3], 100)))
    assert result.finish_reason == "stop" and result.completion_tokens == 3
    assert result.text == Letters().decode([EOS - 2, EOS - 1])


@pytest.mark.parametrize(("batch", "queue"), [(2, 2), (1, 0), (3, 1)])
def test_nothing_is_refused_until_batch_plus_queue_is_exceeded(make, batch, queue) -> None:
    runner = FakeRunner(max_batch=batch)
    scheduler = make(runner, max_queue=queue)
    runner.gate.clear()  # nothing finishes meanwhile; the thread may hold one in prefill
    accepted = [scheduler.submit(*seq([i], 2)) for i in range(batch + queue)]
    with pytest.raises(QueueFullError):
        scheduler.submit(*seq([9], 2))
    runner.gate.set()
    assert [collect(s).text for s in accepted] == [expected([i], 2) for i in range(batch + queue)]


def test_logits_processors_shape_one_request_and_a_failing_one_ends_only_it(make) -> None:
    """A processor (a grammar mask, say) sees its own request's tokens; when it fails, that
    request ends with the error and the others in the batch decode on."""
    runner = FakeRunner(max_batch=3, step_delay=0.002)
    scheduler = make(runner)
    seen: list[list[int]] = []

    def only_z(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(list(generated))
        masked = torch.full_like(logits, float("-inf"))
        masked[25] = 0.0  # the letter z, whatever the model wants
        return masked

    def explode(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) == 2:
            raise RuntimeError("grammar broke")
        return logits

    forced, masked = seq([1], 4)
    masked.processors = [only_z]
    failing, broken = seq([5], 6)
    broken.processors = [explode]
    streams = [
        scheduler.submit(forced, masked),
        scheduler.submit(failing, broken),
        scheduler.submit(*seq([9], 5)),
    ]
    assert collect(streams[0]).text == "zzzz" and seen[:2] == [[], [25]]
    with pytest.raises(RuntimeError, match="grammar broke"):
        collect(streams[1])
    assert collect(streams[2]).text == expected([9], 5)


def test_work_handed_to_the_thread_runs_between_steps_and_requests_carry_their_adapter(make) -> None:
    """`call` (how an adapter is added while requests decode) runs on the inference thread,
    never inside a step, and returns the result or raises the error."""
    runner = FakeRunner(max_batch=2, step_delay=0.01)
    scheduler = make(runner)
    in_step = threading.Event()
    real_step = runner.step
    seen_adapters: list[tuple] = []

    def step(reqs):
        in_step.set()
        seen_adapters.append(tuple(r.adapter for r in reqs))
        try:
            return real_step(reqs)
        finally:
            in_step.clear()

    runner.step = step
    running = scheduler.submit(*seq([1], 40), adapter="lora1")
    next(running)
    where = scheduler.call(lambda: (threading.current_thread().name, in_step.is_set()))
    assert where == ("llmhost-inference", False)
    with pytest.raises(ZeroDivisionError):
        scheduler.call(lambda: 1 / 0)
    assert collect(running).text == expected([1], 40)[1:]  # the first chunk was read above
    assert ("lora1",) in seen_adapters


class ChunkedRunner(FakeRunner):
    """Prefills a prompt one token per call (a chunk), as the llama.cpp runner does per
    PREFILL_CHUNK tokens; records the order of chunks and steps."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[str] = []
        self.done: dict[int, int] = {}
        self.aborted = 0

    def prefill_chunk(self, req):
        n = self.done.get(id(req), 0) + 1
        self.done[id(req)] = n
        self.calls.append("chunk")
        time.sleep(self.step_delay)
        return self.prefill(req) if n == len(req.prompt_ids) else None

    def abort_prefill(self) -> None:
        self.aborted += 1

    def step(self, reqs):
        self.calls.append("step")
        return super().step(reqs)


def test_a_chunked_prefill_lets_running_rows_step_between_chunks(make) -> None:
    runner = ChunkedRunner(max_batch=2, step_delay=0.002)
    scheduler = make(runner)
    running = scheduler.submit(*seq([1], 40))
    next(running)
    long = scheduler.submit(*seq(list(range(2, 12)), 3))  # 10 chunks
    assert collect(long).text == expected(list(range(2, 12)), 3)
    assert collect(running).text == expected([1], 40)[1:]
    assert runner.calls.count("chunk") == 1 + 10  # the running request's prompt, then the long one's
    order = runner.calls[runner.calls.index("step") :]  # once the running request decodes
    last = len(order) - order[::-1].index("chunk")
    assert "chunk,chunk" not in ",".join(order[:last])  # a step between any two chunks


def test_a_request_cancelled_while_its_prompt_is_prefilled_is_dropped_there(make) -> None:
    runner = ChunkedRunner(max_batch=2, step_delay=0.005)
    scheduler = make(runner)
    running = scheduler.submit(*seq([1], 40))
    next(running)
    cancel = threading.Event()
    doomed = scheduler.submit(*seq(list(range(2, 200)), 3), cancel)
    assert wait_for(lambda: runner.calls.count("chunk") >= 3)
    cancel.set()
    assert collect(doomed).finish_reason == "cancelled"
    assert runner.aborted == 1
    assert collect(running).text == expected([1], 40)[1:]
    assert wait_for(lambda: scheduler.running == 0)


def test_each_runners_thread_uses_the_torch_threads_it_declares(make, monkeypatch) -> None:
    """torch's intra-op thread count is per thread, and a new thread starts with the count last
    set anywhere: each inference thread sets its runner's own (llama.cpp's 1, transformers'
    torch's default), whatever the other engines' threads did."""
    from llmhost.hardware import physical_cores, torch_threads

    one, two = FakeRunner(), FakeRunner()
    one.torch_threads, two.torch_threads = 1, 2
    first, second = make(one), make(two)
    assert first.call(torch.get_num_threads) == 1
    assert second.call(torch.get_num_threads) == 2  # started after the first set 1
    assert first.call(torch.get_num_threads) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert torch_threads() == physical_cores()


def _stream(scheduler, prompt, n):
    """A request through the asyncio path (the server's): its chunks with their arrival times."""
    import asyncio

    async def consume():
        arrived = []
        async for chunk in scheduler.submit_async(*seq(prompt, n), asyncio.get_running_loop()):
            arrived.append((time.monotonic(), chunk))
        return arrived

    return asyncio.run(consume())


def test_an_event_loop_is_woken_at_a_pace_while_chunks_keep_coming(make, monkeypatch) -> None:
    """Each wake-up of an event loop from the inference thread costs the model CPU time: while a
    stream's chunks come faster than STREAM_PACE_S, one wake-up carries several, yet the first
    visible chunk and the last go at once and none waits much longer than the pace."""
    from llmhost.engine import scheduler as module

    wakes: list[float] = []
    wake = module._Mailbox._wake
    monkeypatch.setattr(module._Mailbox, "_wake", lambda box: (wakes.append(time.monotonic()), wake(box)))
    scheduler = make(FakeRunner(step_delay=0.002))  # ≈10 chunks per pace
    start = time.monotonic()
    arrived = _stream(scheduler, [1], 60)  # tokens 2..61 (63 is the end of sequence)
    assert "".join(c.text for _, c in arrived) == expected([1], 60)
    assert arrived[-1][1].finish_reason == "length"
    took = arrived[-1][0] - start
    assert 3 <= len(wakes) <= took / module.STREAM_PACE_S + 3 < 60, (len(wakes), took)
    assert wakes[0] - start < module.STREAM_PACE_S  # the first chunk was not held
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(arrived)]
    assert max(gaps) < module.STREAM_PACE_S + 0.1  # slack for a loaded machine
    # slower than the pace, every chunk is sent at once
    wakes.clear()
    slow = make(FakeRunner(step_delay=module.STREAM_PACE_S * 1.5))
    assert len(_stream(slow, [1], 8)) == 8 and len(wakes) == 8


def test_held_chunks_go_before_the_thread_turns_to_a_prompt(make) -> None:
    """A chunk held for the pace is sent before the inference thread prefills another prompt (or
    does anything but a decode step), not after it."""
    import asyncio

    class SlowPrompts(FakeRunner):
        steps = 0

        def step(self, reqs):
            self.steps += 1
            return super().step(reqs)

        def prefill(self, req):
            if req.prompt_ids[0] == 40:  # the second request's prompt: 300 ms
                self.began, self.decoded = time.monotonic(), 1 + self.steps  # the first's chunks so far
                time.sleep(0.3)
            return super().prefill(req)

    runner = SlowPrompts(max_batch=2, step_delay=0.002)
    scheduler = make(runner)

    async def both():
        loop = asyncio.get_running_loop()
        arrived, task = [], None
        async for _ in scheduler.submit_async(*seq([1], 60), loop):
            arrived.append(time.monotonic())
            if len(arrived) == 20:  # mid-stream, another request comes in
                task = loop.create_task(anext(scheduler.submit_async(*seq([40], 2), loop)))
        await task
        return arrived

    arrived = asyncio.run(both())
    assert len(arrived) == 60 and runner.decoded >= 20
    # every chunk decoded before that prompt came out before its prefill ended
    assert sum(t < runner.began + 0.3 for t in arrived) >= runner.decoded
