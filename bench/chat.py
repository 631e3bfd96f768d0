"""Chat serving against llama.cpp's own C++ server, side by side in one run: the same GGUF (the
embedded SmolLM2-135M), the same `openai` client code, rounds alternating between the servers.

    make llama-server                 # builds it from the llama-cpp-python sdist, once
    python bench/chat.py [--rounds 3] [--turns 10]

Rows: one stream's decode tokens/s (greedy and with the default sampling, temperature 0.7 and
top_p 0.9), one stream's time to first token on a short prompt, the first request after start,
8 concurrent clients' aggregate tokens/s, and a chat growing turn by turn (the time to first
token at turn 1 and at the last turn). llama-server runs as `-t <cores> -np 8 -c 16384 -fa on
--jinja`; llmhost with `--engine llamacpp --max-concurrency 8` and the same KV cache size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from llmhost.procs import ServerProcess

REPO = Path(__file__).resolve().parents[1]
LLAMA_SERVER = REPO / ".llama-server" / "build" / "bin" / "llama-server"
MODEL = "smollm2-135m-instruct"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
SHORT = [{"role": "user", "content": "Hi!"}]
QUESTIONS = [
    "Tell me about Paris.",
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
    def __init__(self, gguf: Path, threads: int) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(LLAMA_SERVER), "-m", str(gguf), "-t", str(threads), "-np", "8", "-c", str(CTX)]
        cmd += ["-fa", "on", "--jinja", "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
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


def one(client, messages, tokens: int, sampled: bool = False) -> tuple[float, int, float, str]:
    """(time to first token, completion tokens, decode tokens/s, reply text) of one stream."""
    start = time.perf_counter()
    first = last = None
    parts: list[str] = []
    n = 0
    sampling = {"temperature": 0.7, "top_p": 0.9, "seed": 1} if sampled else {"temperature": 0}
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
        **sampling,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            n = chunk.usage.completion_tokens
    first = first or time.perf_counter()
    last = last or first
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return first - start, n, rate, "".join(parts)


def aggregate(client, clients: int, tokens: int) -> float:
    done: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        n = one(client, STORY, tokens)[1]
        with lock:
            done.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def chat_turns(client, turns: int) -> list[float]:
    """TTFT per turn of one conversation growing turn by turn (each reply is kept in it)."""
    conversation: list[dict] = []
    ttfts = []
    for question in QUESTIONS[:turns]:
        conversation.append({"role": "user", "content": question})
        ttft, _, _, text = one(client, conversation, 160)
        ttfts.append(ttft)
        conversation.append({"role": "assistant", "content": text})
    return ttfts


def measure(client, args) -> dict[str, float]:
    row: dict[str, float] = {}
    row["decode tok/s, greedy"] = one(client, STORY, args.tokens)[2]
    row["decode tok/s, top_p 0.9"] = one(client, STORY, args.tokens, sampled=True)[2]
    row["TTFT short prompt, ms"] = 1000 * statistics.median(one(client, SHORT, 8)[0] for _ in range(5))
    row["8 clients, aggregate tok/s"] = aggregate(client, 8, args.tokens)
    turns = chat_turns(client, args.turns)
    row["chat TTFT turn 1, ms"] = 1000 * turns[0]
    row[f"chat TTFT turn {args.turns}, ms"] = 1000 * turns[-1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    if not LLAMA_SERVER.exists():
        sys.exit(f"{LLAMA_SERVER} is missing: run `make llama-server` first")
    from llmhost.engine.backends.llamacpp import physical_cores
    from llmhost.store.embedded import embedded_gguf

    gguf, _ = embedded_gguf()
    threads = physical_cores()
    kv_gib = CTX * KV_BYTES_PER_TOKEN / 2**30
    rows: dict[str, dict[str, list[float]]] = {"llama-server": {}, "llmhost": {}}
    first_request: dict[str, list[float]] = {"llama-server": [], "llmhost": []}
    for _ in range(args.rounds):
        for name in rows:  # a fresh server per round: the first request after start is a row
            if name == "llama-server":
                server = LlamaServer(gguf, threads)
            else:
                server = ServerProcess(
                    "--engine", "llamacpp", "--max-concurrency", "8", "--kv-cache-gib", f"{kv_gib:.4f}"
                )
            try:
                client = server.client()
                first_request[name].append(1000 * one(client, SHORT, 8)[0])
                for key, value in measure(client, args).items():
                    rows[name].setdefault(key, []).append(value)
            finally:
                server.stop()
    load = os.getloadavg()[0]
    print(f"\nmedians of {args.rounds} rounds; load average (1 min) at the end {load:.2f}\n")
    print("| | llama-server | `llmhost serve --engine llamacpp` | llmhost / llama-server |")
    print("|---|---|---|---|")
    keys = ["first request after start, ms", *rows["llmhost"]]
    rows["llama-server"]["first request after start, ms"] = first_request["llama-server"]
    rows["llmhost"]["first request after start, ms"] = first_request["llmhost"]
    for key in keys:
        a = statistics.median(rows["llama-server"][key])
        b = statistics.median(rows["llmhost"][key])
        print(f"| {key} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
