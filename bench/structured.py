"""What constrained decoding costs: decode tokens/s with a JSON schema and with a forced tool call
(`tool_choice: required`) against the same request unconstrained, in the same run, at 1 and 8
concurrent streaming clients, on both local engines (`llmhost serve --engine transformers` and
`--engine llamacpp`, the embedded model, the official openai client).

    python bench/structured.py [--tokens 96] [--rounds 2]

The prompt makes the model write at length (a list it keeps extending), so every mode decodes
about `--tokens` tokens; the rate is all streams' tokens over the wall time. Each constrained
mode is compared with the same prompt decoded freely: a JSON schema with the plain request, a
forced call with `tool_choice: auto` (the tools' descriptions make that prompt longer, so its
prefill costs more than the plain one's). Modes alternate within each round, so load on the
machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics

from clients import concurrently, stream_once  # bench/clients.py
from llmhost.procs import ServerProcess

ASK = [{"role": "user", "content": "List as many cities of the world as you can, with their countries."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
                "required": ["name", "country"],
            },
        }
    },
    "required": ["cities"],
}
SAVE = {
    "type": "function",
    "function": {
        "name": "save_cities",
        "description": "Save a list of cities with their countries",
        "parameters": SCHEMA,
    },
}
# each constrained mode and its baseline: the same prompt, decoded freely
MODES = {
    "free": {},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "cities", "schema": SCHEMA}}
    },
    "tools, auto": {"tools": [SAVE], "tool_choice": "auto"},
    "tools, required": {"tools": [SAVE], "tool_choice": "required"},
}
BASELINE = {
    "free": "free",
    "json_schema": "free",
    "tools, auto": "tools, auto",
    "tools, required": "tools, auto",
}


def wave(client, extra: dict, clients: int, tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median tokens per request)."""
    results, wall = concurrently(clients, lambda _: stream_once(client, ASK, tokens, **extra))
    return sum(r.tokens for r in results) / wall, statistics.median(r.tokens for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default="transformers,llamacpp")
    args = parser.parse_args()
    rows = []
    for engine in args.engines.split(","):
        server = ServerProcess("--engine", engine, "--max-concurrency", "8")
        try:
            client = server.client()
            for extra in MODES.values():  # warm-up: the first constrained request builds the vocabulary
                stream_once(client, ASK, 8, **extra)
            rates: dict[tuple[str, int], list[float]] = {}
            lengths: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.rounds):
                for clients in (1, 8):
                    for mode, extra in MODES.items():
                        rate, length = wave(client, extra, clients, args.tokens)
                        rates.setdefault((mode, clients), []).append(rate)
                        lengths.setdefault((mode, clients), []).append(length)
            for clients in (1, 8):
                for mode in MODES:
                    base = statistics.median(rates[(BASELINE[mode], clients)])
                    rate = statistics.median(rates[(mode, clients)])
                    tokens = statistics.median(lengths[(mode, clients)])
                    rows.append((engine, clients, mode, tokens, rate, rate / base))
                    print(
                        f"{engine:12} {clients:>2} {mode:14} {tokens:6.0f} {rate:8.1f} {rate / base:6.2f}",
                        flush=True,
                    )
        finally:
            server.stop()
    print()
    print("| engine | clients | mode | tokens/request | aggregate tok/s | vs the same prompt, free |")
    print("|---|---|---|---|---|---|")
    for engine, clients, mode, tokens, rate, ratio in rows:
        print(f"| {engine} | {clients} | {mode} | {tokens:.0f} | {rate:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
