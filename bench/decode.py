"""Decode speed on the embedded model: the tutorials' raw `model.generate` + TextIteratorStreamer
against llmhost's `stream_generate`, in float32 and bfloat16, side by side in one process.

    python bench/decode.py [--tokens 128] [--rounds 3]

Both paths run the same loaded weights with greedy decoding, interleaved round by round, and are
timed from the outside the same way: first-token latency from the call, decode tokens/s from the
first to the last token. Prints a Markdown table; the ratio column is llmhost / raw.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from dataclasses import dataclass

import psutil

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@dataclass
class Run:
    tokens: list[int]
    ttft: float
    tps: float
    peak_rss_mb: float


class PeakRss:
    """Samples this process's RSS every 5 ms while a run is under way."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)


def _summary(stamps: list[float], start: float, tokens: list[int], rss: PeakRss) -> Run:
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return Run(tokens, stamps[0] - start, tps, rss.peak / 2**20)


def run_raw(engine, n: int) -> Run:
    """What the tutorials do: model.generate in a thread, TextIteratorStreamer on the main thread."""
    from transformers import TextIteratorStreamer

    stamps: list[float] = []

    class Timed(TextIteratorStreamer):
        def put(self, value):  # called once with the prompt, then once per new token
            if self.next_tokens_are_prompt is False:
                stamps.append(time.perf_counter())
            super().put(value)

    tok, model = engine.tokenizer, engine.model
    streamer = Timed(tok, skip_prompt=True, skip_special_tokens=True)
    out: dict = {}
    with PeakRss() as rss:
        start = time.perf_counter()
        inputs = tok.apply_chat_template(
            PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        kwargs = dict(**inputs, max_new_tokens=n, do_sample=False, streamer=streamer)
        th = threading.Thread(target=lambda: out.setdefault("ids", model.generate(**kwargs)))
        th.start()
        "".join(streamer)
        th.join()
    ids = out["ids"][0, inputs["input_ids"].shape[1] :].tolist()
    return _summary(stamps, start, ids, rss)


def run_llmhost(engine, n: int) -> Run:
    from llmhost.engine import GenerationParams, GenerationRequest, stream_generate

    params = GenerationParams(temperature=0, max_new_tokens=n)
    stamps: list[float] = []
    ids: list[int] = []
    with PeakRss() as rss:
        start = time.perf_counter()
        for chunk in stream_generate(engine, GenerationRequest(PROMPT, params)):
            stamps.append(time.perf_counter())
            ids.extend(chunk.token_ids)
    return _summary(stamps, start, ids, rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from llmhost.config import LoadSettings
    from llmhost.engine import load

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    for dtype in args.dtypes.split(","):
        engine = load(None, LoadSettings(dtype=dtype))
        run_raw(engine, 8), run_llmhost(engine, 8)  # warm-up
        raw, ours = [], []
        for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits both alike
            raw.append(run_raw(engine, args.tokens))
            ours.append(run_llmhost(engine, args.tokens))
        same = all(r.tokens == o.tokens[: len(r.tokens)] for r, o in zip(raw, ours, strict=True))
        for name, runs in (("raw generate + TextIteratorStreamer", raw), ("llmhost stream_generate", ours)):
            rows.append(
                (
                    dtype,
                    name,
                    len(runs[0].tokens),
                    statistics.median(r.tps for r in runs),
                    statistics.median(r.ttft for r in runs) * 1000,
                    max(r.peak_rss_mb for r in runs),
                    same,
                )
            )
        del engine

    base = {r[0]: r for r in rows if r[1].startswith("raw")}
    base_dtype = rows[0][0]
    print(f"\nembedded model, {args.tokens} new tokens, greedy, median of {args.rounds} interleaved rounds\n")
    print(
        "| dtype | path | tokens | decode tok/s | ratio vs raw (same dtype) | ratio vs raw "
        f"{base_dtype} | TTFT ms | peak RSS MB | same tokens |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for dtype, name, n, tps, ttft, rss, same in rows:
        print(
            f"| {dtype} | {name} | {n} | {tps:.1f} | {tps / base[dtype][3]:.3f} | "
            f"{tps / base[base_dtype][3]:.3f} | {ttft:.0f} | {rss:.0f} | {same} |"
        )


if __name__ == "__main__":
    main()
