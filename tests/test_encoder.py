"""The Batcher behind embedding models and rerankers, on a stand-in forward pass (each row's
output is its token count and the batch it ran in): requests share batches, a request larger
than the token budget spans several, one request's bad input fails only that request, a failed
batch fails only its requests, and an unloaded model fails what still waits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import pytest

from llmhost.engine.encoder import Batcher, Row
from llmhost.errors import InvalidRequestError, LlmhostError


class Forward:
    """Records each batch; `gate` holds the first batch until the test releases it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()  # the first batch is running (held at the gate)
        self.fail_on = fail_on

    def __call__(self, rows: list[Row]) -> list[tuple[int, int]]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append([len(r["input_ids"]) for r in rows])
        if self.fail_on is not None and self.fail_on in self.batches[-1]:
            raise RuntimeError("the forward pass failed")
        return [(len(r["input_ids"]), len(self.batches)) for r in rows]


def rows(*lengths: int):
    return lambda: [{"input_ids": [7] * n} for n in lengths]


def test_waiting_requests_share_a_batch_and_a_big_one_spans_several() -> None:
    forward = Forward()
    batcher = Batcher(forward, "stand-in", budget=10)
    try:
        first = batcher.submit(rows(1))  # runs alone, held at the gate while the others arrive
        assert forward.entered.wait(10)
        waiting = [batcher.submit(rows(2, 3)), batcher.submit(rows(4)), batcher.submit(rows(6, 6))]
        forward.gate.set()
        wait([first, *waiting], timeout=10)
        assert first.result() == [(1, 1)]
        assert waiting[0].result() == [(2, 2), (3, 2)] and waiting[1].result() == [(4, 2)]
        assert waiting[2].result() == [(6, 3), (6, 4)]  # over the budget: one row per batch
        assert forward.batches == [[1], [2, 3, 4], [6], [6]]
        assert (batcher.batches, batcher.rows) == (4, 6)
    finally:
        batcher.close()


def test_bad_input_and_a_failed_batch_fail_only_their_requests() -> None:
    forward = Forward(fail_on=5)
    batcher = Batcher(forward, "stand-in", budget=100)

    def bad() -> list[Row]:
        raise InvalidRequestError("input[0] is empty")

    try:
        held = batcher.submit(rows(1))
        assert forward.entered.wait(10)
        refused, neighbour, doomed = batcher.submit(bad), batcher.submit(rows(2)), batcher.submit(rows(3, 5))
        forward.gate.set()
        wait([held, refused, neighbour, doomed], timeout=10)
        with pytest.raises(InvalidRequestError, match="input"):
            refused.result()
        with pytest.raises(RuntimeError, match="failed"):
            doomed.result()  # its batch failed, and with it the request that shared it
        with pytest.raises(RuntimeError):
            neighbour.result()
        assert held.result() == [(1, 1)] and batcher.submit(rows()).result(timeout=10) == []
        assert batcher.submit(rows(4)).result(timeout=10) == [(4, 3)]  # the worker goes on
    finally:
        batcher.close()


def test_closing_fails_what_waits() -> None:
    forward = Forward()
    batcher = Batcher(forward, "stand-in")
    running = batcher.submit(rows(1))
    assert forward.entered.wait(10)
    queued = batcher.submit(rows(2))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    while not batcher._closed:  # closed while the first batch still runs
        time.sleep(0.001)
    forward.gate.set()
    closer.join(10)
    assert running.result(timeout=10) == [(1, 1)]
    with pytest.raises(LlmhostError, match="unloaded"):
        queued.result(timeout=10)
    with pytest.raises(LlmhostError, match="unloaded"):
        batcher.submit(rows(1))


class Timed:
    """A forward pass that takes `seconds` and records each batch's row lengths."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.batches = seconds, []

    def __call__(self, rows: list[Row]) -> list[int]:
        time.sleep(self.seconds)
        self.batches.append([len(r["input_ids"]) for r in rows])
        return [len(r["input_ids"]) for r in rows]


def loaded(monkeypatch: pytest.MonkeyPatch, tokens: int, overlap: bool = False) -> tuple[Batcher, Timed]:
    """A batcher that has just served 9 requests in flight at once (one running, 8 waiting), of
    `tokens` tokens each; waits may last 0.5 s, so a busy test machine does not decide them."""
    monkeypatch.setattr("llmhost.engine.encoder.MAX_WAIT", 0.5)
    forward = Timed(1.2)  # the wait is at most half of this
    batcher = Batcher(forward, "stand-in", overlap=overlap)
    first = batcher.submit(rows(tokens))
    time.sleep(0.3)  # the first batch runs alone; these 8 wait for it and make the next
    wait([first, *[batcher.submit(rows(tokens)) for _ in range(8)]], timeout=30)
    assert [len(b) for b in forward.batches] == [1, 8]
    return batcher, forward


def test_under_load_a_free_worker_waits_for_the_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, forward = loaded(monkeypatch, 4)
    try:
        early = batcher.submit(rows(4))  # the first of the 9 clients back
        time.sleep(0.1)
        late = [batcher.submit(rows(4)) for _ in range(7)]
        wait([early, *late], timeout=30)
        # one batch of 8, not 1 then 7 (a forward pass of one short text is the costliest per
        # row); it ran after the wait ended at 0.5 s with 8 of the 9 back
        assert [len(b) for b in forward.batches[2:]] == [8]
    finally:
        batcher.close()


@pytest.mark.parametrize(("overlap", "batches"), [(True, [5, 4]), (False, [9])])
def test_half_the_load_runs_while_the_other_half_comes_back_where_it_overlaps(
    monkeypatch: pytest.MonkeyPatch, overlap: bool, batches: list[int]
) -> None:
    """On a GPU (overlap) half of them (5 x 100 tokens, a full batch) start while the rest come
    back; on a CPU the batch waits for all of them, whose HTTP work would slow its pass."""
    batcher, forward = loaded(monkeypatch, 100, overlap)
    try:
        half = [batcher.submit(rows(100)) for _ in range(5)]
        time.sleep(0.3)
        rest = [batcher.submit(rows(100)) for _ in range(4)]
        wait([*half, *rest], timeout=30)
        assert [len(b) for b in forward.batches[2:]] == batches
    finally:
        batcher.close()


def test_an_idle_batcher_runs_a_lone_request_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llmhost.engine.encoder.MAX_WAIT", 0.5)
    forward = Timed(0.0)
    batcher = Batcher(forward, "stand-in")
    try:
        for _ in range(3):
            start = time.perf_counter()
            assert batcher.submit(rows(4)).result(timeout=30) == [4]
            assert time.perf_counter() - start < 0.4  # no collection wait (it would be 0.5 s)
    finally:
        batcher.close()
