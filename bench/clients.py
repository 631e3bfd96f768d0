"""What the serving benches share: one streamed chat request through the official openai client,
timed as a user sees it, and N of them at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
MODEL = "smollm2-135m-instruct"


@dataclass
class Streamed:
    ttft: float
    """Seconds from the call to the first piece of the reply (content or a tool call)."""
    tokens: int
    """completion_tokens from the usage chunk."""
    rate: float
    """Decode tokens/s after the first piece (0 when it came in one piece)."""
    text: str


def stream_once(
    client: Any, messages: list[dict], max_tokens: int, model: str = MODEL, **extra: Any
) -> Streamed:
    """One streamed request (greedy unless `extra` says otherwise)."""
    start = time.perf_counter()
    first = last = None
    parts: list[str] = []
    n = 0
    kwargs = {"temperature": 0, **extra}
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].delta.tool_calls):
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            n = chunk.usage.completion_tokens
    first = first or time.perf_counter()
    last = last or first
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return Streamed(first - start, n, rate, "".join(parts))


def concurrently(clients: int, work: Callable[[int], T]) -> tuple[list[T], float]:
    """`work(i)` for i in range(clients), each on a thread of its own, all at once; the results
    and the wall time."""
    results: list[T] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        r = work(i)
        with lock:
            results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start
