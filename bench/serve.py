"""Serving throughput: `llmhost serve` on the embedded model driven by 1, 4 and 8 concurrent
streaming clients (the official openai client), side by side with a one-request-at-a-time
baseline and the in-process `stream_generate` rate, all in one run.

    python bench/serve.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from llmhost.procs import ServerProcess

TOPICS = [
    "a dragon who learns to cook",
    "a robot lost in Paris",
    "a cat that runs a bakery",
    "two friends sailing to Iceland",
    "a lighthouse keeper's secret",
    "a city under the sea",
    "a clockmaker and a storm",
    "the last tree on Mars",
]
PROMPTS = [[{"role": "user", "content": f"Write a long story about {t}."}] for t in TOPICS]


def one_request(client, messages, tokens: int) -> tuple[float, int, float]:
    """(time to first token, completion tokens, per-request decode tokens/s)."""
    start = time.perf_counter()
    first = last = None
    n = 0
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            n = chunk.usage.completion_tokens
    assert first is not None and last is not None
    return first - start, n, (n - 1) / (last - first) if last > first else 0.0


def wave(client, clients: int, tokens: int) -> dict:
    results: list = []
    lock = threading.Lock()

    def work(i: int) -> None:
        r = one_request(client, PROMPTS[i % len(PROMPTS)], tokens)
        with lock:
            results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "agg": sum(r[1] for r in results) / wall,
        "ttft50": statistics.median(ttfts),
        "ttft99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "per_req": statistics.median(r[2] for r in results),
    }


def sequential(client, n: int, tokens: int) -> dict:
    start = time.perf_counter()
    results = [one_request(client, PROMPTS[i % len(PROMPTS)], tokens) for i in range(n)]
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "agg": sum(r[1] for r in results) / wall,
        "ttft50": statistics.median(ttfts),
        "ttft99": ttfts[-1],
        "per_req": statistics.median(r[2] for r in results),
    }


def in_process(tokens: int) -> float:
    from llmhost.engine import GenerationParams, load

    engine = load()
    rates = []
    for messages in PROMPTS[:4]:
        r = engine.generate(messages, GenerationParams(temperature=0, max_new_tokens=tokens))
        rates.append(r.decode_tps or 0.0)
    engine.close()
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    server = ServerProcess("--max-concurrency", "8")
    try:
        client = server.client()
        one_request(client, PROMPTS[0], 8)  # warm-up
        rows = [("one at a time (baseline), 8 requests", sequential(client, 8, args.tokens))]
        for n in (1, 4, 8):
            rows.append((f"{n} concurrent clients", wave(client, n, args.tokens)))
    finally:
        server.stop()
    local = in_process(args.tokens)

    base = rows[0][1]["agg"]
    single = rows[1][1]
    print(f"\nembedded model via HTTP, {args.tokens} max tokens per request, greedy\n")
    print("| load | aggregate tok/s | × baseline | TTFT p50 ms | TTFT p99 ms | per-request tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['agg']:.1f} | {r['agg'] / base:.2f} | {r['ttft50'] * 1000:.0f} | "
            f"{r['ttft99'] * 1000:.0f} | {r['per_req']:.1f} |"
        )
    print(
        f"\nsingle-client decode through HTTP: {single['per_req']:.1f} tok/s; in-process stream_generate: "
        f"{local:.1f} tok/s; ratio {single['per_req'] / local:.3f}"
    )
    print(f"aggregate at 8 clients / single client: {rows[3][1]['agg'] / single['agg']:.2f}×")


if __name__ == "__main__":
    main()
