"""Chat serving against llama.cpp's own C++ server, side by side in one run: the same GGUF (the
embedded SmolLM2-135M), the same `openai` client code, rounds alternating between the servers.

    make llama-server                 # builds it from the llama-cpp-python sdist, once
    python bench/chat.py [--rounds 3] [--turns 10]

Rows: one stream's decode tokens/s (greedy and with the default sampling, temperature 0.7 and
top_p 0.9); one stream's time to first token on a short prompt (the same one again, and a new
one each time); the first request after start; 8 concurrent clients' aggregate tokens/s; a
chat growing turn by turn, ≈180 prompt tokens at turn 1 (a new trip to plan, so no server has
it cached) to ≈1,700 at turn 10 (the time to first token at turn 1 and at the last turn, the
next question sent at once, and after a user's `--think` seconds); a 1,600-token prompt
arriving while a stream decodes (the
stream's longest pause, the long prompt's time to first token). llama-server runs as
`-t <cores> -np 8 -c 16384 -fa on --jinja`; llmhost with `--engine llamacpp --max-concurrency 8`
and the same KV cache size. A second table runs the chat rows on llmhost with
`--prefix-cache fast` too (a reply's cells reused as decoded, as llama-server does).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from clients import concurrently, stream_once  # bench/clients.py
from llmhost.procs import ServerProcess

REPO = Path(__file__).resolve().parents[1]
LLAMA_SERVER = REPO / ".llama-server" / "build" / "bin" / "llama-server"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
SHORT = [{"role": "user", "content": "Hi!"}]
#: a chat's opening message, ≈150 tokens of context before the first question
TRIP = (
    "I am planning my first trip to {city} with my partner and our two children, aged 7 and 11. "
    "We arrive on a Friday morning by train and leave on the following Wednesday evening. We will "
    "stay in a small rented flat near the centre, we do not have a car, and we would rather walk "
    "or take public transport than taxis. Our budget is moderate: we are happy to pay for one or "
    "two special experiences, but we want to eat simply most days. The children love animals, "
    "boats and anything to do with science; my partner is interested in art and architecture, "
    "and I enjoy long walks and local markets. None of us speaks the local language. "
)
QUESTIONS = [
    "Tell me about {city}.",
    "And what about its museums?",
    "Which one is the biggest?",
    "How do I get there by metro?",
    "What else should I see nearby?",
    "Any food tips?",
    "Where can I eat cheaply?",
    "Is it safe at night?",
    "What is the weather like in spring?",
    "Thanks! One last tip?",
]
CTX = 16384
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16


class LlamaServer:
    def __init__(
        self, gguf: Path, threads: int, repack: bool, slots: int = 8, extra: list[str] | None = None
    ) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = CTX * slots // 8  # 2048 tokens a slot
        cmd = [str(LLAMA_SERVER), "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(ctx)]
        cmd += ["-fa", "on", "--jinja", "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        cmd += [] if repack else ["--no-repack"]  # as llmhost decided for this CPU (AMX may fault)
        cmd += extra or []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-server did not start")

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


SAMPLED = {"temperature": 0.7, "top_p": 0.9, "seed": 1}


def aggregate(client, clients: int, tokens: int) -> float:
    results, wall = concurrently(clients, lambda _: stream_once(client, STORY, tokens))
    return sum(r.tokens for r in results) / wall


def chat_turns(client, turns: int, think: float, city: str) -> list[float]:
    """TTFT per turn of one conversation growing turn by turn (each reply is kept in it), the
    user taking `think` seconds to read a reply and type the next question; the first message
    describes a trip to `city` (a city per chat: its turn 1 is cold)."""
    conversation: list[dict] = []
    ttfts = []
    for i, question in enumerate(QUESTIONS[:turns]):
        content = (TRIP if i == 0 else "") + question
        conversation.append({"role": "user", "content": content.format(city=city)})
        reply = stream_once(client, conversation, 160)
        ttfts.append(reply.ttft)
        conversation.append({"role": "assistant", "content": reply.text})
        time.sleep(think)
    return ttfts


LONG = [{"role": "user", "content": "Summarize this. " + "The river runs to the sea. " * 230}]


def pause_for_a_long_prompt(client) -> tuple[float, float]:
    """A 1,600-token prompt arrives while a stream decodes: the stream's longest pause between
    two chunks while the long prompt is prefilled, and the long request's time to first token."""
    import threading

    arrivals: list[float] = []

    def running() -> None:
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=STORY, max_tokens=200, temperature=0, stream=True
        )
        for _ in stream:
            arrivals.append(time.perf_counter())

    thread = threading.Thread(target=running)
    thread.start()
    while len(arrivals) < 10 and thread.is_alive():
        time.sleep(0.01)
    start = time.perf_counter()
    ttft = stream_once(client, LONG, 1).ttft
    end = time.perf_counter()
    thread.join()
    gaps = [b - a for a, b in itertools.pairwise(arrivals) if start <= b <= end]
    return max(gaps, default=end - start), ttft


CITIES = ["Paris", "Lisbon"]  # one chat sent at once, one with the user's think time


def measure_chats(client, args) -> dict[str, float]:
    row: dict[str, float] = {}
    for city, think in zip(CITIES, (0.0, args.think), strict=True):
        turns = chat_turns(client, args.turns, think, city)
        row[f"chat TTFT turn 1 ({think:g} s to reply), ms"] = 1000 * turns[0]
        row[f"chat TTFT turn {args.turns} ({think:g} s to reply), ms"] = 1000 * turns[-1]
    return row


def measure(client, args) -> dict[str, float]:
    row: dict[str, float] = {}
    row["decode tok/s, greedy"] = stream_once(client, STORY, args.tokens).rate
    row["decode tok/s, top_p 0.9"] = stream_once(client, STORY, args.tokens, **SAMPLED).rate
    row["TTFT short prompt, the same again, ms"] = 1000 * statistics.median(
        stream_once(client, SHORT, 8).ttft for _ in range(5)
    )
    row["TTFT short prompt, a new one each time, ms"] = 1000 * statistics.median(
        stream_once(client, [{"role": "user", "content": f"Hi! I am visitor {i}."}], 8).ttft for i in range(5)
    )
    row["8 clients, aggregate tok/s"] = aggregate(client, 8, args.tokens)
    row.update(measure_chats(client, args))
    pause, ttft = pause_for_a_long_prompt(client)
    row["a stream's longest pause while a 1,600-token prompt prefills, ms"] = 1000 * pause
    row["that long prompt's TTFT, ms"] = 1000 * ttft
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--think", type=float, default=2.0, help="seconds a chat user takes per turn")
    args = parser.parse_args()
    if not LLAMA_SERVER.exists():
        sys.exit(f"{LLAMA_SERVER} is missing: run `make llama-server` first")
    from llmhost.engine.backends.llamacpp.repack import decide
    from llmhost.hardware import physical_cores
    from llmhost.store.embedded import embedded_gguf

    gguf, _ = embedded_gguf()
    threads = physical_cores()
    repack = bool(decide("auto", gguf).use)  # the weights' layout both servers use
    print(f"weight repack: {'on' if repack else 'off'}", flush=True)
    kv_gib = CTX * KV_BYTES_PER_TOKEN / 2**30
    names = ("llama-server", "llmhost", "llmhost fast")
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for _ in range(args.rounds):
        for name in names:  # a fresh server per round: the first request after start is a row
            if name == "llama-server":
                server = LlamaServer(gguf, threads, repack)
            else:
                flags = ["--max-concurrency", "8", "--kv-cache-gib", f"{kv_gib:.4f}"]
                if name == "llmhost fast":
                    flags += ["--prefix-cache", "fast"]
                server = ServerProcess("--engine", "llamacpp", *flags)
            try:
                client = server.client()
                client.models.list()  # the client's own first call (≈250 ms of imports) is not the server's
                if name == "llmhost fast":  # the chat rows only: the rest runs as exact does
                    measured = measure_chats(client, args)
                else:
                    measured = {"first request after start, ms": 1000 * stream_once(client, SHORT, 8).ttft}
                    measured.update(measure(client, args))
                for key, value in measured.items():
                    rows[name].setdefault(key, []).append(value)
            finally:
                server.stop()
    load = os.getloadavg()[0]
    print(f"\nmedians of {args.rounds} rounds; load average (1 min) at the end {load:.2f}\n")
    print("| | llama-server | `llmhost serve --engine llamacpp` | llmhost / llama-server |")
    print("|---|---|---|---|")
    median = {name: {key: statistics.median(v) for key, v in rows[name].items()} for name in names}
    for key, a in median["llama-server"].items():
        b = median["llmhost"][key]
        print(f"| {key} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print("\nThe chat rows with both prefix caches (`--prefix-cache exact`, the default, and `fast`):\n")
    print("| | llama-server | llmhost exact | llmhost fast | exact / llama-server | fast / llama-server |")
    print("|---|---|---|---|---|---|")
    chat = [key for key in median["llmhost fast"]]
    for think in (0.0, args.think):  # the target: turn 10 within 1.2x turn 1
        first, last = (f"chat TTFT turn {n} ({think:g} s to reply), ms" for n in (1, args.turns))
        key = f"chat turn {args.turns} / turn 1 ({think:g} s to reply)"
        for name in names:
            median[name][key] = median[name][last] / median[name][first]
        chat.append(key)
    for key in chat:
        a, b, c = (median[name][key] for name in names)
        print(f"| {key} | {a:.2f} | {b:.2f} | {c:.2f} | {b / a:.2f} | {c / a:.2f} |")


if __name__ == "__main__":
    main()
