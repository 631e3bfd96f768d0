"""Decode speed of the engines on the embedded model: transformers (the default dtype for this
CPU) against llama.cpp on the same GGUF, and llama-cpp-python's own generate loop as the floor
of what the binding can do. Same prompt, greedy decoding. Each measurement runs in its own
process (two engines in one process compete for threads), alternating, in one session.

    python bench/engines.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import isolated  # bench/isolated.py: the script's folder is on sys.path

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
RUNS = ("transformers", "llamacpp", "llama-cpp-python alone")


def measure(which: str, tokens: int) -> dict:
    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.engine.params import GenerationParams

    settings = (
        LoadSettings() if which == "transformers" else LoadSettings(engine="llamacpp", context_length=2048)
    )
    engine = load(None, settings)
    engine.generate(STORY, GenerationParams(temperature=0, max_new_tokens=8))  # warm-up
    if which == "llama-cpp-python alone":
        return {"tps": native_rate(engine, tokens), "ttft": float("nan")}
    result = engine.generate(STORY, GenerationParams(temperature=0, max_new_tokens=tokens))
    return {"tps": result.decode_tps or 0.0, "ttft": result.ttft_s or 0.0}


def native_rate(engine, tokens: int) -> float:
    """The binding's own generate loop (its sampler, no llmhost on top)."""
    llm, ids, n, start = engine.llm, engine.encode_chat(STORY), 0, None
    llm.reset()
    for _tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if start is None:
            start = time.perf_counter()  # after the prompt, like decode tok/s above
        n += 1
        if n == tokens:
            break
    return (n - 1) / (time.perf_counter() - start)


def spawn(which: str, tokens: int) -> dict:
    return isolated.run(__file__, ["--child", which, "--tokens", str(tokens)], timeout=900)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        isolated.report(measure(a.child, a.tokens))
        return
    from llmhost.engine.llamacpp import INSTALL, available

    if not available():
        raise SystemExit(f"llama-cpp-python is not installed: {INSTALL}")
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for _ in range(a.rounds):
        for name in RUNS:  # alternate, so drift hits all alike
            results[name].append(spawn(name, a.tokens))
    base = statistics.median(r["tps"] for r in results["transformers"])
    print(f"embedded model, {a.tokens} tokens greedy, {a.rounds} alternating rounds (median), a process each")
    print(f"{'engine':<26}{'decode tok/s':>14}{'ratio':>8}{'TTFT s':>10}")
    for name in RUNS:
        tps = statistics.median(r["tps"] for r in results[name])
        ttft = statistics.median(r["ttft"] for r in results[name])
        print(f"{name:<26}{tps:>14.1f}{tps / base:>8.2f}{ttft:>10.3f}")


if __name__ == "__main__":
    main()
