"""What a llama.cpp runner measures at its first prefill, on the thread that decodes: which
exactness scheme its prefix cache gets (`exactness`, the runner's class notes say why) and what
a forward pass over n positions costs (`batch_cost`, for speculation)."""

from __future__ import annotations

import logging
import time
from typing import Any

import llmhost.engine.backends.llamacpp.kernels as kernels
from llmhost.engine.backends.llamacpp.slots import PREFILL_BLOCK
from llmhost.engine.speculation import BatchCost

log = logging.getLogger("llmhost.llamacpp")

#: The pass sizes timed for `batch_cost` (positions), and how many times each (the least counts).
COST_SIZES = (1, 2, 4, 8, 16, 32)
COST_REPEATS = 3


def exactness(runner: Any) -> None:
    """Which exactness scheme this model gets here (see the class notes); logged."""
    runner.reuse.invariant = False
    if runner.backends:
        kernels.set_reference(runner.backends, True)
        runner.reuse.invariant = decoded_equal_prefilled(runner)
        if not runner.reuse.invariant:
            kernels.set_reference(runner.backends, False)
    runner.reuse.granular = runner.reuse.invariant or rows_independent(runner)
    log.info(
        "llama.cpp, exact prefix cache: %s",
        "reference kernels, every cell reused as it is (a reply's too)"
        if runner.reuse.invariant
        else "a reply's cells are made reusable while idle; "
        + ("partial blocks reused" if runner.reuse.granular else "whole blocks reused"),
    )


def decoded_equal_prefilled(runner: Any) -> bool:
    """Whether a prompt's last logits come out the same evaluated as a partial block then a
    whole one, and as a whole block then decode steps, alone and beside another slot's row
    (a stream copy): every cell took a different batch each way, so a reply's decoded cells
    are then the cells a cold run of the next turn makes, in whatever block it puts them.
    Costs a prefill of 96 tokens, another of 64 and 32 decode steps, once."""
    import llama_cpp

    half = PREFILL_BLOCK // 2
    n = PREFILL_BLOCK + half
    ids = probe(runner, n)
    slots = [0, 1] if runner.max_batch > 1 else [0]
    for s in slots:
        llama_cpp.llama_memory_seq_rm(runner.memory, s, -1, -1)
    for start, end in ((0, half), (half, n)):
        runner._decode([(ids[p], p, 0, p == n - 1) for p in range(start, end)])
    prefilled = runner._logits(n - 1 - half)
    llama_cpp.llama_memory_seq_rm(runner.memory, 0, -1, -1)
    runner._decode([(t, i, 0, False) for i, t in enumerate(ids[:PREFILL_BLOCK])])
    for s in slots[1:]:
        llama_cpp.llama_memory_seq_cp(runner.memory, 0, s, -1, -1)
    for pos in range(PREFILL_BLOCK, n):
        runner._decode([(ids[pos], pos, s, pos == n - 1) for s in slots])
    decoded = [runner._logits(i) for i in range(len(slots))]
    for s in slots:
        llama_cpp.llama_memory_seq_rm(runner.memory, s, -1, -1)
    return all(bool((d == prefilled).all()) for d in decoded)


def probe(runner: Any, n: int) -> list[int]:
    """`n` ordinary tokens to measure with (which ones does not matter)."""
    return [(i * 7919) % (runner.n_vocab - 256) + 128 for i in range(n)]


def rows_independent(runner: Any) -> bool:
    """Whether llama.cpp computes a position alike in any batch below PREFILL_BLOCK rows for
    this model, here: measured, not assumed. Then the cells of a prompt's last, partial
    block are what a cold run of another prompt computes for the same tokens in its own
    partial block, and a prompt that shares part of it reuses that part (a new question
    after the same system prompt). True for Q4_0, Q4_1 and Q8_0 on llama.cpp's CPU kernels;
    false for K-quants, whose repacked kernels vary with the row count, and for a build
    whose tiled attention starts below 64 rows. Costs two prefills of 63 tokens, once."""
    import llama_cpp

    n = PREFILL_BLOCK - 1
    ids = probe(runner, n)
    last = []
    for sizes in ([n], [1, n // 2 - 1, n - n // 2]):
        llama_cpp.llama_memory_seq_rm(runner.memory, 0, -1, -1)
        start = 0
        for size in sizes:
            part = ids[start : start + size]
            runner._decode([(t, start + i, 0, start + i == n - 1) for i, t in enumerate(part)])
            start += size
        last.append(runner._logits(sizes[-1] - 1))
    llama_cpp.llama_memory_seq_rm(runner.memory, 0, -1, -1)
    return bool((last[0] == last[1]).all())


def batch_cost(runner: Any, what: str = "llama.cpp") -> BatchCost:
    """The time of one forward pass over n positions of a sequence PREFILL_BLOCK tokens in, at
    COST_SIZES (the least of COST_REPEATS each), under the kernels the runner decodes with:
    what a row's proposal adds to a step, for speculation's rule. Costs ≈ 200 positions'
    evaluation, once."""
    import llama_cpp

    ids = probe(runner, PREFILL_BLOCK + max(COST_SIZES))
    llama_cpp.llama_memory_seq_rm(runner.memory, 0, -1, -1)
    runner._decode([(t, i, 0, False) for i, t in enumerate(ids[:PREFILL_BLOCK])])
    sizes = [n for n in COST_SIZES if n <= runner.max_positions]
    seconds = []
    for n in sizes:
        part = [(ids[PREFILL_BLOCK + i], PREFILL_BLOCK + i, 0, True) for i in range(n)]
        best = float("inf")
        for _ in range(COST_REPEATS):
            began = time.perf_counter()
            runner._decode(part)
            best = min(best, time.perf_counter() - began)
            llama_cpp.llama_memory_seq_rm(runner.memory, 0, PREFILL_BLOCK, -1)
        seconds.append(best)
    llama_cpp.llama_memory_seq_rm(runner.memory, 0, -1, -1)
    log.info(
        "%s, one pass over n positions: %s",
        what,
        ", ".join(f"{n}: {1000 * t:.1f} ms" for n, t in zip(sizes, seconds, strict=True)),
    )
    return BatchCost(sizes, seconds)
