"""What the protocol adapters cost: the same streamed prompts through chat completions, Anthropic
Messages and OpenAI Responses (each through its own official SDK) against one `llmhost serve` on
the embedded model, 1 and 8 clients at once. Rounds interleave the protocols so that the
machine's drift falls on all three; ratios are to chat completions in the same run.

    python bench/protocols.py [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from clients import MODEL, Streamed, concurrently, stream_once  # bench/clients.py
from llmhost.procs import ServerProcess

TOPICS = [
    "a dragon who learns to cook", "a robot lost in Paris", "a cat that runs a bakery",
    "two friends sailing to Iceland", "a lighthouse keeper's secret", "a city under the sea",
    "a clockmaker and a storm", "the last tree on Mars",
]  # fmt: skip


def ask(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


def timed(
    start: float, events: Any, is_text: Callable[[Any], bool], tokens: Callable[[Any], int | None]
) -> Streamed:
    """A stream timed as a user sees it from `start` (before the call): first text piece, last
    piece, tokens from the usage."""
    first = last = None
    n = 0
    for event in events:
        if is_text(event):
            last = time.perf_counter()
            first = first or last
        n = tokens(event) or n
    first = first or time.perf_counter()
    last = last or first
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return Streamed(first - start, n, rate, "")


def chat(server: ServerProcess) -> Callable[[int, int], Streamed]:
    client = server.client()
    return lambda i, tokens: stream_once(client, [{"role": "user", "content": ask(i)}], tokens)


def messages(server: ServerProcess) -> Callable[[int, int], Streamed]:
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)

    def one(i: int, tokens: int) -> Streamed:
        start = time.perf_counter()
        events = client.messages.create(
            model=MODEL, max_tokens=tokens, messages=[{"role": "user", "content": ask(i)}], stream=True,
            extra_body={"temperature": 0},
        )  # fmt: skip
        return timed(
            start,
            events,
            lambda e: e.type == "content_block_delta",
            lambda e: e.usage.output_tokens if e.type == "message_delta" else None,
        )

    return one


def responses(server: ServerProcess) -> Callable[[int, int], Streamed]:
    client = server.client()

    def one(i: int, tokens: int) -> Streamed:
        start = time.perf_counter()
        events = client.responses.create(
            model=MODEL, input=ask(i), max_output_tokens=tokens, temperature=0, stream=True
        )
        return timed(start, events, lambda e: e.type == "response.output_text.delta", _usage)

    return one


def _usage(event: Any) -> int | None:
    done = event.type in ("response.completed", "response.incomplete")
    return event.response.usage.output_tokens if done else None


PROTOCOLS = {"chat completions": chat, "Anthropic Messages": messages, "OpenAI Responses": responses}


def wave(send: Callable[[int, int], Streamed], clients: int, tokens: int) -> tuple[float, list[Streamed]]:
    """Aggregate tokens/s of `clients` requests at once, and each request's measures."""
    results, wall = concurrently(clients, lambda i: send(i, tokens))
    return sum(r.tokens for r in results) / wall, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    server = ServerProcess("--max-concurrency", "8")
    seen: dict[tuple[str, int], list[tuple[float, list[Streamed]]]] = {}
    try:
        senders = {name: make(server) for name, make in PROTOCOLS.items()}
        for send in senders.values():
            send(0, 8)  # warm-up: each SDK's first connection
        for round_ in range(args.rounds):
            order = list(senders.items())
            order = order[round_ % 3 :] + order[: round_ % 3]  # each protocol goes first once
            for clients in (1, 8):
                for name, send in order:
                    seen.setdefault((name, clients), []).append(wave(send, clients, args.tokens))
    finally:
        server.stop()

    print(f"\nembedded model (llama.cpp) via `llmhost serve`, {args.tokens} max tokens, greedy, streamed; "
          f"medians of {args.rounds} interleaved rounds\n")  # fmt: skip
    print(
        "| protocol | clients | aggregate tok/s | × chat | TTFT p50 ms | × chat | per-request tok/s "
        "| × chat |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for clients in (1, 8):
        base = None
        for name in PROTOCOLS:
            waves = seen[(name, clients)]
            agg = statistics.median(w[0] for w in waves)
            ttft = statistics.median(r.ttft for w in waves for r in w[1])
            rate = statistics.median(r.rate for w in waves for r in w[1])
            base = base or (agg, ttft, rate)
            print(
                f"| {name} | {clients} | {agg:.1f} | {agg / base[0]:.3f} | {ttft * 1000:.0f} | "
                f"{base[1] / ttft:.3f} | {rate:.1f} | {rate / base[2]:.3f} |"
            )
    print("\n× chat: above 1 is better (for TTFT, chat's time over the protocol's).")


if __name__ == "__main__":
    main()
