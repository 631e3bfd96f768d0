"""Soak: N clients (default 8) stream short chat replies back to back against `llmhost serve` on
each local engine until a number of streams or a time limit: streams/s, errors by kind, time to
first token p50/p99, and the server's memory (RSS, children included) every 500 streams.

Every stream is checked: it must end with a finish reason and `data: [DONE]`, and its usage
must count the tokens it asked for or fewer. RSS growth is measured from the first sample (after
500 streams of warm-up) to the last.

    python bench/soak.py [--streams 10000] [--seconds 1800] [--clients 8] [--tokens 8]
                         [--engines llamacpp,transformers]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from llmhost.procs import ServerProcess

MODEL = "smollm2-135m-instruct"
TOPICS = ["tea", "rain", "a cat", "Paris", "the sea", "a clock", "bread", "snow"]


def rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child that just ended
            total += child.memory_info().rss
    return total / 2**20


def soak(engine: str, a: argparse.Namespace) -> dict:
    from openai import OpenAI

    server = ServerProcess(
        "--engine", engine, "--context-length", "2048", "--max-concurrency", str(a.clients)
    )
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    lock = threading.Lock()
    done = 0
    errors: collections.Counter[str] = collections.Counter()
    ttfts: list[float] = []
    rss: list[tuple[int, float]] = []
    deadline = time.monotonic() + a.seconds
    stop = threading.Event()

    def one(i: int) -> None:
        nonlocal done
        started, first, finish, usage = time.perf_counter(), None, None, None
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Say one thing about {TOPICS[i % len(TOPICS)]}."}],
                max_tokens=a.tokens,
                temperature=0.7,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if first is None and choice.delta.content:
                        first = time.perf_counter()
                    finish = choice.finish_reason or finish
            if finish is None or usage is None or not 0 < usage.completion_tokens <= a.tokens:
                raise AssertionError(f"malformed stream: finish {finish}, usage {usage}")
        except Exception as err:  # counted by kind, the soak goes on
            with lock:
                errors[type(err).__name__] += 1
            return
        with lock:
            done += 1
            if first is not None:
                ttfts.append(first - started)
            if done % 500 == 0:
                rss.append((done, rss_mib(server.proc.pid)))
                print(f"  {engine}: {done} streams, RSS {rss[-1][1]:.0f} MiB", flush=True)

    def worker(w: int) -> None:
        i = w
        while not stop.is_set():
            if time.monotonic() > deadline or done + sum(errors.values()) >= a.streams:
                stop.set()
                return
            one(i)
            i += a.clients

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(worker, range(a.clients)))
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    ttfts.sort()
    growth = (rss[-1][1] / rss[0][1] - 1) * 100 if len(rss) > 1 else float("nan")
    return {
        "streams": done,
        "per_s": done / elapsed,
        "errors": dict(errors),
        "p50": statistics.median(ttfts) if ttfts else float("nan"),
        "p99": ttfts[int(0.99 * (len(ttfts) - 1))] if ttfts else float("nan"),
        "rss_first": rss[0][1] if rss else float("nan"),
        "rss_last": rss[-1][1] if rss else float("nan"),
        "growth": growth,
        "seconds": elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=1800)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--engines", default="llamacpp,transformers")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"embedded model; {a.clients} clients streaming {a.tokens}-token replies back to back")
    rows = []
    for engine in a.engines.split(","):
        rows.append((engine, soak(engine, a)))
        e, r = rows[-1]
        print(
            f"{e}: {r['streams']} streams in {r['seconds']:.0f} s ({r['per_s']:.1f}/s), "
            f"errors {r['errors'] or 0}, "
            f"TTFT p50 {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms, RSS {r['rss_first']:.0f} → "
            f"{r['rss_last']:.0f} MiB ({r['growth']:+.1f}% after warm-up)",
            flush=True,
        )
    head = f"{'engine':<14}{'streams':>8}{'/s':>7}{'errors':>8}{'p50 ms':>8}{'p99 ms':>8}"
    print(f"\n{head}{'RSS MiB':>14}{'growth':>8}")
    for e, r in rows:
        n_err = sum(r["errors"].values())
        print(
            f"{e:<14}{r['streams']:>8}{r['per_s']:>7.1f}{n_err:>8}"
            f"{r['p50'] * 1000:>8.0f}{r['p99'] * 1000:>8.0f}"
            f"{r['rss_first']:>7.0f}→{r['rss_last']:<6.0f}{r['growth']:>+7.1f}%"
        )


if __name__ == "__main__":
    main()
