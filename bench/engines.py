"""Decode speed of the engines on the embedded model, side by side in one process: transformers
(the default dtype for this CPU) against llama.cpp on the same GGUF, same prompt, greedy decoding,
alternating runs.

    python bench/engines.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

from llmhost.config import LoadSettings
from llmhost.engine import load
from llmhost.engine.llamacpp import INSTALL, available
from llmhost.engine.params import GenerationParams

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def native_rate(engine, tokens: int) -> float:
    """The binding's own generate loop (its sampler, no llmhost on top): what llama.cpp alone does."""
    import time

    llm, ids, n = engine.llm, engine.encode_chat(STORY), 0
    llm.reset()
    start = None
    for _tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if start is None:
            start = time.perf_counter()  # after the prompt, like decode tok/s above
        n += 1
        if n == tokens:
            break
    return (n - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not available():
        raise SystemExit(f"llama-cpp-python is not installed: {INSTALL}")
    engines = {
        "transformers": load(None, LoadSettings()),
        "llamacpp": load(None, LoadSettings(engine="llamacpp", context_length=2048)),
    }
    params = GenerationParams(temperature=0, max_new_tokens=a.tokens)
    for engine in engines.values():  # warm-up
        engine.generate(STORY, GenerationParams(temperature=0, max_new_tokens=8))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(a.rounds):
        for name, engine in engines.items():
            result = engine.generate(STORY, params)
            rates[name].append(result.decode_tps or 0.0)
            ttft[name].append(result.ttft_s or 0.0)
    rates["llama-cpp-python alone"] = [native_rate(engines["llamacpp"], a.tokens) for _ in range(a.rounds)]
    ttft["llama-cpp-python alone"] = [float("nan")]
    base = statistics.median(rates["transformers"])
    print(f"embedded model, {a.tokens} tokens greedy, {a.rounds} alternating rounds (median)")
    print(f"{'engine':<26}{'decode tok/s':>14}{'ratio':>8}{'TTFT s':>10}")
    for name in rates:
        rate = statistics.median(rates[name])
        print(f"{name:<26}{rate:>14.1f}{rate / base:>8.2f}{statistics.median(ttft[name]):>10.3f}")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
