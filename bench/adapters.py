"""Many LoRA adapters on one loaded base: what serving them per request costs, and how long a
request for a model that is not loaded waits (`llmhost serve --all`, the official openai client).

    python bench/adapters.py [--tokens 64] [--rounds 2] [--engine transformers]

Four random LoRA adapters (r=8 on every projection, as `llmhost finetune` trains them) of the
embedded model go into a scratch store. One server serves the base and the adapters; in each
round, alternating, 8 streaming clients all ask the base, then 8 clients spread over the four
adapters (two each): the aggregate decode rate of the adapters against the base's is the cost
of decoding with per-row adapters. Then, with nothing loaded, the time from a request for the
base to its first token (the load), and for an adapter whose base is loaded (adding it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from clients import concurrently, stream_once  # bench/clients.py
from llmhost.procs import ServerProcess

ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
ADAPTERS = ["ft-1", "ft-2", "ft-3", "ft-4"]


def scratch_home() -> Path:
    """A home whose store holds four adapters of the embedded model (conversions reused)."""
    from llmhost.config import llmhost_home
    from llmhost.engine import resolve_ref
    from llmhost.store.local import Store
    from llmhost.testing import build_adapter

    base = resolve_ref(None).hf_folder()
    root = Path(tempfile.mkdtemp(prefix="llmhost-bench-adapters-"))
    (root / "converted").symlink_to(llmhost_home() / "converted")
    store = Store(root / "models")
    for seed, name in enumerate(ADAPTERS):
        folder = build_adapter(root / "build" / name, base, seed, rank=8, every_projection=True, scale=0.02)
        with store.write(name) as w:
            for file in folder.iterdir():
                shutil.copy2(file, w.staging / file.name)
            w.commit("lora", "finetune", extra={"base": "default"})
    return root


def rate(client, models: list[str], tokens: int) -> float:
    """Aggregate decode tokens/s of 8 streaming clients, client i asking models[i % len]."""
    results, wall = concurrently(8, lambda i: stream_once(client, ASK, tokens, model=models[i % len(models)]))
    print(f"  {', '.join(models)}: {[r.tokens for r in results]} tokens in {wall:.2f} s", file=sys.stderr)
    return sum(r.tokens for r in results) / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine", default="transformers")
    args = ap.parse_args()
    home = scratch_home()
    env = {"LLMHOST_HOME": str(home)}
    flags = ["--all", "--engine", args.engine, "--max-concurrency", "8", "--keep-alive", "-1"]
    server = ServerProcess(*flags, env=env, timeout=600)
    base = "smollm2-135m-instruct"
    try:
        client = server.client()
        for model in [base, *ADAPTERS]:  # load the base and add every adapter before timing
            stream_once(client, ASK, 4, model=model)
        plain, mixed = [], []
        for _ in range(args.rounds):
            plain.append(rate(client, [base], args.tokens))
            mixed.append(rate(client, ADAPTERS, args.tokens))
    finally:
        server.stop()
    server = ServerProcess(*flags, env=env, timeout=600)
    try:
        client = server.client()
        cold = stream_once(client, ASK, 4, model=base).ttft
        warm = stream_once(client, ASK, 4, model=base).ttft
        added = stream_once(client, ASK, 4, model=ADAPTERS[0]).ttft
        adapter_warm = stream_once(client, ASK, 4, model=ADAPTERS[0]).ttft
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    p, m = statistics.median(plain), statistics.median(mixed)
    load = os.getloadavg()[0]
    print(f"\n{args.engine}, embedded model, {args.tokens} tokens a reply, {args.rounds} rounds", end="")
    print(f", load {load:.1f}")
    print("| 8 streaming clients | aggregate tok/s | ratio |\n|---|---|---|")
    print(f"| all on the base | {p:.1f} | 1.00 |")
    print(f"| 2 on each of 4 adapters | {m:.1f} | {m / p:.2f} |")
    print("\n| first token | ms |\n|---|---|")
    print(f"| base, not loaded (loads it) | {cold * 1000:.0f} |")
    print(f"| base, loaded | {warm * 1000:.0f} |")
    print(f"| adapter, base loaded (adds it) | {added * 1000:.0f} |")
    print(f"| adapter, added | {adapter_warm * 1000:.0f} |")


if __name__ == "__main__":
    main()
