"""The engines on the embedded model, each against itself used directly, side by side in one run:
single-stream decode tokens/s, time to first token, and aggregate tokens/s with 8 concurrent
clients. "Direct" is the engine with nothing of llmhost's serving in between:

- transformers: llmhost's engine in-process (so the serve row is the cost of the HTTP server);
- llama.cpp: llama-cpp-python's own generate loop (it decodes one sequence at a time, so its
  8 clients are served one after another), then llmhost's engine in-process and served;
- vLLM: vLLM's own OpenAI server, the very child llmhost runs, called on its private port,
  against the same requests through `llmhost serve --engine vllm` in front of it.

Greedy decoding, the same prompt; rounds alternate direct and served; medians are printed.
In-process measurements run in a process of their own (bench/isolated.py).

    python bench/engines.py [--tokens 128] [--clients 8] [--rounds 3] [--engines transformers,llamacpp,vllm]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import isolated  # bench/isolated.py: the script's folder is on sys.path
from llmhost.engine.request import GenerationRequest
from llmhost.procs import ServerProcess

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
MODEL = "smollm2-135m-instruct"


# -- in-process (a child process per measurement) ---------------------------------------------


def in_process(which: str, tokens: int, clients: int) -> dict:
    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.engine.params import GenerationParams

    kind = "transformers" if which == "transformers" else "llamacpp"
    engine = load(None, LoadSettings(engine=kind, context_length=2048))
    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    engine.generate(GenerationRequest(STORY, GenerationParams(temperature=0, max_new_tokens=8)))  # warm-up
    if which == "llama-cpp-python":
        return native(engine, tokens, clients)
    one = engine.generate(GenerationRequest(STORY, params))
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(
            r.completion_tokens
            for r in pool.map(lambda _: engine.generate(GenerationRequest(STORY, params)), range(clients))
        )
    return {"tps": one.decode_tps, "ttft": one.ttft_s, "agg": done / (time.perf_counter() - start)}


def native(engine, tokens: int, clients: int) -> dict:
    """The binding's own generate loop, no llmhost on top; one sequence at a time."""
    from llmhost.engine.backends.llamacpp.repack import open_model
    from llmhost.store.embedded import embedded_gguf

    # the weight repack llmhost's engine uses here (off where this CPU's AMX faults)
    llm = open_model(embedded_gguf()[0], bool(engine.llm.model_params.use_extra_bufts), n_ctx=2048)
    ids = engine.encode_chat(STORY)

    def run() -> tuple[float, float, int]:
        llm.reset()
        t0, first, n = time.perf_counter(), None, 0
        for _tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            first = first or time.perf_counter()
            n += 1
            if n == tokens:
                break
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first), n

    run()  # warm-up
    ttft, tps, _ = run()
    start = time.perf_counter()
    done = sum(run()[2] for _ in range(clients))
    return {"tps": tps, "ttft": ttft, "agg": done / (time.perf_counter() - start)}


# -- over HTTP, the official client --------------------------------------------------------------


def over_http(base_url: str, key: str, tokens: int, clients: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)

    def one() -> tuple[float, float, int]:
        t0, first, last, n = time.perf_counter(), None, None, 0
        stream = client.chat.completions.create(
            model=MODEL, messages=STORY, temperature=0, max_tokens=tokens, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                last = time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return first - t0, (n - 1) / (last - first), n

    one()  # warm-up
    ttft, tps, _ = one()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(r[2] for r in pool.map(lambda _: one(), range(clients)))
    return {"tps": tps, "ttft": ttft, "agg": done / (time.perf_counter() - start)}


def vllm_direct(server: ServerProcess) -> tuple[str, str]:
    """The private URL and key of the vLLM child behind `server` (read from /proc: a benchmark's
    privilege; llmhost never exposes them)."""
    import psutil

    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        cmd = " ".join(proc.cmdline())
        if "vllm_child.py" in cmd and (m := re.search(r"--port (\d+)", cmd)):
            return f"http://127.0.0.1:{m.group(1)}/v1", proc.environ()["VLLM_API_KEY"]
    raise RuntimeError("no vLLM child found")


# -- the table ---------------------------------------------------------------------------------


def block(engine: str, a: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(row, baseline row, median result) for one engine; its server lives only meanwhile."""
    key = "bench-key"
    flags = {"transformers": ["--engine", "transformers"], "llamacpp": ["--engine", "llamacpp"]}
    flags["vllm"] = ["--engine", "vllm", "--dtype", "float32"]
    server = ServerProcess(
        *flags[engine], "--context-length", "2048", "--api-key", key, "--max-concurrency", str(a.clients),
        timeout=900,
    )  # fmt: skip
    args = ["--tokens", str(a.tokens), "--clients", str(a.clients)]
    runs: dict[str, object] = {}
    if engine == "vllm":
        url, vkey = vllm_direct(server)
        runs["vLLM's own server"] = lambda: over_http(url, vkey, a.tokens, a.clients)
    elif engine == "llamacpp":
        runs["llama-cpp-python alone"] = lambda: isolated.run(
            __file__, ["--child", "llama-cpp-python", *args]
        )
        runs["llama.cpp in llmhost"] = lambda: isolated.run(__file__, ["--child", "llamacpp", *args])
    else:
        runs["transformers in llmhost"] = lambda: isolated.run(__file__, ["--child", "transformers", *args])
    runs[f"llmhost serve --engine {engine}"] = lambda: over_http(server.url + "/v1", key, a.tokens, a.clients)
    try:
        got: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():  # alternate, so drift hits all alike
                got[name].append(fn())
    finally:
        server.stop()
    base = next(iter(runs))
    return [
        (name, base, {k: statistics.median(r[k] for r in got[name]) for k in ("tps", "ttft", "agg")})
        for name in runs
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="transformers,llamacpp,vllm")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        isolated.report(in_process(a.child, a.tokens, a.clients))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    isolated.use_repo_vllm()
    setup = f"{a.tokens} tokens; {a.clients} concurrent clients; {a.rounds} rounds (median)"
    print(f"embedded model, greedy, {setup}")
    agg = f"agg tok/s @{a.clients}"
    print(f"{'run':<36}{'decode tok/s':>13}{'ratio':>7}{'TTFT s':>8}{agg:>15}{'ratio':>7}", flush=True)
    failed = []
    for engine in a.engines.split(","):  # each engine's rows as soon as they are measured
        try:
            rows = block(engine, a)
        except Exception as err:  # one engine failing must not lose the others' numbers
            print(f"{engine:<36}failed: {str(err).splitlines()[0]}", flush=True)
            failed.append(engine)
            continue
        by_name = {name: r for name, _, r in rows}
        for name, base, r in rows:
            b = by_name[base]
            print(
                f"{name:<36}{r['tps']:>13.1f}{r['tps'] / b['tps']:>7.2f}{r['ttft']:>8.3f}"
                f"{r['agg']:>15.1f}{r['agg'] / b['agg']:>7.2f}",
                flush=True,
            )
    print("ratio: against the first row of the same engine (the engine used directly)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
