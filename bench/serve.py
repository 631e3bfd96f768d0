"""Serving throughput: `llmhost serve` on the embedded model driven by 1, 4 and 8 concurrent
streaming clients (the official openai client), side by side with a one-request-at-a-time
baseline and the in-process `stream_generate` rate, all in one run.

    python bench/serve.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from clients import concurrently, stream_once  # bench/clients.py
from llmhost.engine.request import GenerationRequest
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
    r = stream_once(client, messages, tokens)
    return r.ttft, r.tokens, r.rate


def wave(client, clients: int, tokens: int) -> dict:
    results, wall = concurrently(clients, lambda i: one_request(client, PROMPTS[i % len(PROMPTS)], tokens))
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
        r = engine.generate(
            GenerationRequest(messages, GenerationParams(temperature=0, max_new_tokens=tokens))
        )
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
