"""What the protocol adapters cost: the same streamed prompts through chat completions, Anthropic
Messages and OpenAI Responses against one `llmhost serve` on the embedded model, 1 and 8 clients
at once. Rounds interleave the protocols so that the machine's drift falls on all three; ratios
are to chat completions in the same run. Each request's prompt is new (no prefix-cache hit).

`--client raw` (default) reads the server-sent events with httpx, the same code for all three,
so the ratios are the server's; `--client sdk` goes through each protocol's official SDK
(openai, anthropic), whose event parsing runs on the same 2 cores as the server.

    python bench/protocols.py [--tokens 64] [--rounds 3] [--client raw|sdk]
"""

from __future__ import annotations

import argparse
import itertools
import json
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
    # a new opening each time: every request evaluates its prompt (no prefix-cache hit)
    return f"{next(SERIAL)}. Write a long story about {TOPICS[i % len(TOPICS)]}."


SERIAL = itertools.count(1)


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


SDK = {"chat completions": chat, "Anthropic Messages": messages, "OpenAI Responses": responses}


def raw(path: str, body: Callable[[int, int], dict], text: str, usage: Callable[[dict], int | None]):
    """A protocol read as raw server-sent events: `text` is the event type that carries text."""

    def make(server: ServerProcess) -> Callable[[int, int], Streamed]:
        import httpx

        http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": "Bearer none"})

        def one(i: int, tokens: int) -> Streamed:
            start = time.perf_counter()
            with http.stream("POST", path, json={**body(i, tokens), "stream": True}) as r:
                events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
                return timed(start, events, lambda e: _kind(e) == text, usage)

        return one

    return make


def _kind(event: dict) -> str:
    if "choices" in event:  # chat completions: a chunk with content
        delta = event["choices"][0]["delta"] if event["choices"] else {}
        return "chat.text" if delta.get("content") else "chat.other"
    return event.get("type", "")


def _user(i: int) -> list[dict]:
    return [{"role": "user", "content": ask(i)}]


RAW = {
    "chat completions": raw(
        "/v1/chat/completions",
        lambda i, n: {"model": MODEL, "messages": _user(i), "max_tokens": n, "temperature": 0,
                      "stream_options": {"include_usage": True}},
        "chat.text",
        lambda e: (e.get("usage") or {}).get("completion_tokens"),
    ),
    "Anthropic Messages": raw(
        "/v1/messages",
        lambda i, n: {"model": MODEL, "messages": _user(i), "max_tokens": n, "temperature": 0},
        "content_block_delta",
        lambda e: e["usage"]["output_tokens"] if e.get("type") == "message_delta" else None,
    ),
    "OpenAI Responses": raw(
        "/v1/responses",
        lambda i, n: {"model": MODEL, "input": ask(i), "max_output_tokens": n, "temperature": 0},
        "response.output_text.delta",
        lambda e: e["response"]["usage"]["output_tokens"]
        if e.get("type") in ("response.completed", "response.incomplete") else None,
    ),
}  # fmt: skip


def wave(
    send: Callable[[int, int], Streamed], clients: int, tokens: int, each: int
) -> tuple[float, list[Streamed]]:
    """Aggregate tokens/s of `clients` clients at once, each sending `each` requests one after
    another, and every request's measures."""
    per_client, wall = concurrently(clients, lambda i: [send(i * each + k, tokens) for k in range(each)])
    results = [r for done in per_client for r in done]
    return sum(r.tokens for r in results) / wall, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", choices=["raw", "sdk"], default="raw")
    ap.add_argument("--each", type=int, default=4, help="requests each client sends per round")
    args = ap.parse_args()
    protocols = RAW if args.client == "raw" else SDK

    server = ServerProcess("--max-concurrency", "8")
    seen: dict[tuple[str, int], list[tuple[float, list[Streamed]]]] = {}
    try:
        senders = {name: make(server) for name, make in protocols.items()}
        for send in senders.values():
            send(0, 8)  # warm-up: each SDK's first connection
        for round_ in range(args.rounds):
            order = list(senders.items())
            order = order[round_ % 3 :] + order[: round_ % 3]  # each protocol goes first once
            # one client: the protocols take turns request by request (the finest interleaving)
            for _ in range(args.each):
                for name, send in order:
                    seen.setdefault((name, 1), []).append(wave(send, 1, args.tokens, 1))
            for name, send in order:
                seen.setdefault((name, 8), []).append(wave(send, 8, args.tokens, args.each))
    finally:
        server.stop()

    print(f"\nembedded model (llama.cpp) via `llmhost serve`, {args.tokens} max tokens, greedy, streamed, "
          f"{args.client} client; {args.rounds} interleaved rounds of {args.each} requests per client; "
          "medians\n")  # fmt: skip
    print(
        "| protocol | clients | aggregate tok/s | × chat | TTFT p50 ms | × chat | per-request tok/s "
        "| × chat |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for clients in (1, 8):
        base = None
        for name in protocols:
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
