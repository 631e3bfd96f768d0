"""llama.cpp's weight repack (`--weight-repack on|off`), side by side in one run on this CPU:
llmhost's llama.cpp engine with the repack on and off, on the embedded model (Q4_1) and on a
Q4_0 copy of it (the type ggml's AVX2/AVX-512 repack covers), rounds alternating; and what the
decision costs at load (the probe child, once per machine, against the cached verdict).

    python bench/repack.py [--rounds 3] [--tokens 128]

Where this CPU's AMX faults (the probe says so), the `on` rows are not measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from llmhost.engine.request import GenerationRequest

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
LONG = [
    {
        "role": "user",
        "content": "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 45,
    }
]


def q4_0_copy(gguf: Path, folder: Path) -> Path:
    """The embedded model requantized to Q4_0 (speed only: requantizing costs quality)."""
    import llama_cpp

    out = folder / "smollm2-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # a line per tensor
        code = llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params)
    if code != 0:
        raise RuntimeError("llama.cpp could not quantize the model to Q4_0")
    return out


def measure(engine, tokens: int) -> dict[str, float]:
    from llmhost.engine.params import GenerationParams

    engine.scheduler.runner.forget()  # every prefill cold
    reply = engine.generate(GenerationRequest(STORY, GenerationParams(temperature=0, max_new_tokens=tokens)))
    engine.scheduler.runner.forget()
    long = engine.generate(GenerationRequest(LONG, GenerationParams(temperature=0, max_new_tokens=1)))
    return {"decode tok/s": reply.decode_tps or 0.0, "prefill of a 512-token prompt, s": long.ttft_s or 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.engine.backends.llamacpp.repack import probe
    from llmhost.hardware import cpu_info
    from llmhost.store.embedded import embedded_gguf
    from llmhost.store.probes import repack_decision

    gguf, _ = embedded_gguf()
    started = time.perf_counter()
    verdict = probe(gguf)
    probe_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        repack_decision("auto")
    cached_ms = (time.perf_counter() - started) * 10
    settings = ["off", "on"] if verdict.use else ["off"]
    print(f"CPU: {cpu_info().model}; probe: {verdict.reason}", flush=True)

    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"Q4_1 (embedded)": gguf, "Q4_0": q4_0_copy(gguf, Path(tmp))}
        engines = {
            (name, s): load(str(path), LoadSettings(engine="llamacpp", context_length=2048, weight_repack=s))
            for name, path in models.items()
            for s in settings
        }
        for engine in engines.values():
            measure(engine, 8)  # warm-up
        for _ in range(args.rounds):
            for key, engine in engines.items():  # alternating: the machine's noise hits both alike
                for metric, value in measure(engine, args.tokens).items():
                    rows.setdefault(key, {}).setdefault(metric, []).append(value)
        for engine in engines.values():
            engine.close()

    print(f"\n{args.rounds} rounds, medians; ratio = on / off\n")
    print("| model | metric | repack off | repack on | ratio |\n|---|---|---|---|---|")
    for name in models:
        for metric in rows[(name, "off")]:
            off = statistics.median(rows[(name, "off")][metric])
            on = statistics.median(rows[(name, "on")][metric]) if (name, "on") in rows else float("nan")
            print(f"| {name} | {metric} | {off:.3f} | {on:.3f} | {on / off:.2f} |")
    print("\n| the decision at load | cost |\n|---|---|")
    print(f"| probe child, once per machine (AMX CPUs only) | {probe_s:.2f} s |")
    print(f"| cached verdict, every later load | {cached_ms:.2f} ms |")


if __name__ == "__main__":
    main()
