"""Prompt-lookup speculation, side by side in one run: llmhost with and without it, and llama.cpp's
own C++ server without and with each of its draft-model-free `--spec-type` modes, on the same GGUF
(the embedded SmolLM2-135M), greedy, the same `openai` client code.

    make llama-server                 # builds it from the llama-cpp-python sdist, once
    python bench/speculative.py [--rounds 2] [--tokens 256]

Tasks: (a) copy: the prompt holds a ≈400-token Python file and asks for it back with one change;
(b) extract: a passage and a request to list what it says, quoting it; (c) open: a question with
nothing to copy. Each at 1 client and at 4 (the same request, four conversations at once).
Reported: completion tokens/s (all clients' tokens over the wall time), the median of the rounds,
and whether each configuration's greedy replies equal the same server's replies without
speculation (`same text`). llmhost runs `--speculative off|auto|ngram` (auto: where its checks
are exact and while the measured cost says it pays; ngram: wherever a match is found);
llama-server `-t <cores> -np 4 -c 8192 -fa on --jinja`, with `--spec-type T` for
each T (its own defaults).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from chat import LLAMA_SERVER, LlamaServer  # bench/chat.py
from clients import concurrently, stream_once  # bench/clients.py
from llmhost.procs import ServerProcess

REPO = Path(__file__).resolve().parents[1]
CODE = (REPO / "src" / "llmhost" / "engine" / "speculation.py").read_text().split("\n\n\n")[2][:1600]
PASSAGE = (
    "The Grand Canal of China, begun in the 5th century BC, links Beijing in the north with "
    "Hangzhou in the south. It is 1,794 kilometres long, the longest canal in the world. Its "
    "oldest parts were dug under the state of Wu; the Sui dynasty joined them into one waterway "
    "in 609 AD, and the Yuan dynasty straightened it in the 13th century. The canal carried grain "
    "from the Yangtze delta to the capital for more than a thousand years. In 2014 UNESCO listed "
    "it as a World Heritage Site. Today its southern part still carries barges of coal, sand and "
    "building materials, while its northern part is mostly dry."
)
TASKS = {
    "copy": f"Here is a Python file:\n\n```python\n{CODE}\n```\n\nWrite the whole file again, "
    "unchanged except that the class Lookup is renamed to NgramIndex.",
    "extract": f"{PASSAGE}\n\nList every date and number in this passage, each with the sentence "
    "it comes from, quoted exactly.",
    "open": "Why do cats purr? Answer in a few paragraphs.",
}
LLAMA_SPEC = ("ngram-simple", "ngram-mod", "ngram-map-k", "ngram-cache")


def run_tasks(client, tokens: int) -> dict[tuple[str, int], tuple[float, list[str]]]:
    """Per (task, clients): tokens/s and the replies' texts (client order)."""
    out = {}
    for task, prompt in TASKS.items():
        messages = [{"role": "user", "content": prompt}]
        stream_once(client, messages, 4)  # the prompt cached: rounds compare decoding
        for clients in (1, 4):
            results, wall = concurrently(clients, lambda i, m=messages: (i, stream_once(client, m, tokens)))
            results.sort(key=lambda r: r[0])
            out[task, clients] = (sum(r.tokens for _, r in results) / wall, [r.text for _, r in results])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    if not LLAMA_SERVER.exists():
        sys.exit(f"{LLAMA_SERVER} is missing: run `make llama-server` first")
    from llmhost.engine.backends.llamacpp.repack import decide
    from llmhost.hardware import physical_cores
    from llmhost.store.embedded import embedded_gguf

    gguf, _ = embedded_gguf()
    threads = physical_cores()
    repack = bool(decide("auto", gguf).use)
    configs: dict[str, list[str] | None] = {
        "llmhost off": ["off"],
        "llmhost auto": ["auto"],
        "llmhost ngram": ["ngram"],
    }
    configs |= {"llama-server": None} | {f"llama-server {t}": [t] for t in LLAMA_SPEC}
    rates: dict[str, dict[tuple[str, int], list[float]]] = {name: {} for name in configs}
    texts: dict[str, dict[tuple[str, int], list[str]]] = {}
    for _ in range(args.rounds):
        for name, spec in configs.items():
            if name.startswith("llmhost"):
                assert spec is not None
                flags = ["--max-concurrency", "4", "--context-length", "2048", "--speculative", spec[0]]
                server = ServerProcess("--engine", "llamacpp", *flags)
            else:
                extra = [] if spec is None else ["--spec-type", spec[0]]  # each with its own defaults
                server = LlamaServer(gguf, threads, repack, slots=4, extra=extra)
            try:
                measured = run_tasks(server.client(), args.tokens)
            finally:
                server.stop()
            for key, (rate, replies) in measured.items():
                rates[name].setdefault(key, []).append(rate)
                texts.setdefault(name, {})[key] = replies
    load = os.getloadavg()[0]
    print(
        f"\nmedians of {args.rounds} rounds, {args.tokens} tokens a reply; load average (1 min) {load:.2f}\n"
    )
    base = {"llmhost": "llmhost off", "llama-server": "llama-server"}
    print("| task, clients | " + " | ".join(configs) + " |")
    print("|---" * (len(configs) + 1) + "|")
    median = {n: {k: statistics.median(v) for k, v in rates[n].items()} for n in configs}
    for key in median["llmhost off"]:
        cells = [f"{median[n][key]:.1f}" for n in configs]
        print(f"| {key[0]}, {key[1]} | " + " | ".join(cells) + " |")
    print("\nRatios: tokens/s over the same server's without speculation; llmhost over llama-server's best\n")
    head = ["llmhost auto / off", "llmhost ngram / off", "best llama-server / none"]
    head += ["llmhost auto / best llama-server", "same text (llmhost auto, ngram)"]
    print("| task, clients | " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|")
    for key in median["llmhost off"]:
        best = max(median[f"llama-server {t}"][key] for t in LLAMA_SPEC)
        off, plain = median[base["llmhost"]][key], median[base["llama-server"]][key]
        auto, ngram = median["llmhost auto"][key], median["llmhost ngram"][key]
        same = all(texts[n][key] == texts["llmhost off"][key] for n in ("llmhost auto", "llmhost ngram"))
        print(
            f"| {key[0]}, {key[1]} | {auto / off:.2f} | {ngram / off:.2f} | {best / plain:.2f} | "
            f"{auto / best:.2f} | {'yes' if same else 'no'} |"
        )
    print("\nllama-server's replies equal its own without speculation:")
    for t in LLAMA_SPEC:
        same = [k for k in texts["llama-server"] if texts[f"llama-server {t}"][k] == texts["llama-server"][k]]
        print(f"  {t}: {len(same)} of {len(texts['llama-server'])} cases")


if __name__ == "__main__":
    main()
