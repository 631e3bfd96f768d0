"""KV cache types (`--kv-cache`), side by side in one run on this CPU, each in a fresh process (so
resident memory is its own): a long conversation filling the embedded model's whole window (8192
tokens, its trained maximum), its resident memory after the load and after the prompt, the
prompt's time, and decode tokens/s at that depth; then the perplexity of a fixed text (this
repository's docs) with each cache, against the 16-bit one's. llama.cpp's types (f16, q8_0,
q4_0) by default; `--engine transformers` compares its cache in the model's dtype (float32 here)
with its q8_0 (engine/backends/hf_kvcache.py).

    python bench/kv_cache.py [--engine llamacpp|transformers] [--tokens 64] [--window 8192]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"llamacpp": ("f16", "q8_0", "q4_0"), "transformers": ("f16", "q8_0")}


def text(limit_chars: int) -> str:
    """A fixed English text: the repository's docs, in name order."""
    parts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(parts)[:limit_chars]


def child(engine_kind: str, cache: str, window: int, tokens: int) -> dict[str, float]:
    import psutil

    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.engine.params import GenerationParams
    from llmhost.engine.request import GenerationRequest

    me = psutil.Process()
    settings = LoadSettings(engine=engine_kind, context_length=window, max_concurrency=1, kv_cache=cache)
    if engine_kind == "transformers":  # the GGUF's weights, dequantized: float32, as the tests run it
        settings = settings.model_copy(update={"dtype": "float32"})
    engine = load(None, settings)
    loaded = me.memory_info().rss
    doc = engine.encode_plain(text(200_000))
    room = window - tokens - 64  # the template's markers and the question
    question = engine.decoder.decode(doc[:room])
    messages = [{"role": "user", "content": question + "\n\nSummarise the text above in one paragraph."}]
    started = time.perf_counter()
    r = engine.generate(GenerationRequest(messages, GenerationParams(temperature=0, max_new_tokens=tokens)))
    wall = time.perf_counter() - started
    after = me.memory_info().rss
    engine.close()
    return {
        "prompt_tokens": r.prompt_tokens,
        "rss_loaded_mib": loaded / 2**20,
        "rss_after_mib": after / 2**20,
        "prefill_s": r.ttft_s or 0.0,
        "decode_tps": r.decode_tps or 0.0,
        "wall_s": wall,
        "nll": nll(cache) if engine_kind == "llamacpp" else hf_nll(cache),
    }


def hf_nll(cache: str, n_ctx: int = 2048, block: int = 64) -> float:
    """The same on transformers: the text read in blocks of 64 tokens, each attending to the
    cache of the type `cache` (the model's dtype for f16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmhost.engine import resolve_ref
    from llmhost.engine.backends.hf_folder import cache_kwarg
    from llmhost.engine.backends.hf_kvcache import new_cache

    folder = str(resolve_ref(None).hf_folder())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(text(50_000))["input_ids"][: n_ctx + 1]])
    kv, total = {cache_kwarg(model): new_cache(model, cache)}, 0.0
    with torch.no_grad():
        for start in range(0, n_ctx, block):
            logits = model(input_ids=ids[:, start : start + block], **kv).logits[0].log_softmax(-1)
            total -= logits.gather(-1, ids[0, start + 1 : start + block + 1, None]).sum().item()
    return total / n_ctx


def nll(cache: str, n_ctx: int = 2048) -> float:
    """Mean negative log-likelihood of the fixed text's first `n_ctx` tokens, every position
    predicted through the cache of type `cache` (llama.cpp's own Llama, logits for all)."""
    import llama_cpp
    import numpy as np

    from llmhost.engine.backends.llamacpp.offload import KV_TYPES
    from llmhost.store.embedded import embedded_gguf

    kind = KV_TYPES[cache]
    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf()[0]), n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=True,
        flash_attn=True, type_k=kind, type_v=kind, verbose=False,
    )  # fmt: skip
    ids = llm.tokenize(text(50_000).encode(), add_bos=True, special=False)[:n_ctx]
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=list(TYPES), default="llamacpp")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--child", choices=TYPES["llamacpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.engine, args.child, args.window, args.tokens)))
        return
    rows = {}
    for cache in TYPES[args.engine]:
        cmd = [sys.executable, __file__, "--engine", args.engine, "--child", cache]
        cmd += ["--tokens", str(args.tokens), "--window", str(args.window)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[cache] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["f16"]
    print(
        f"embedded model on {args.engine}, one conversation of {base['prompt_tokens']} prompt tokens, "
        f"{args.tokens} decoded"
    )
    heads = ("RSS loaded", "RSS after", "growth", "prefill s", "decode t/s", "vs f16", "ppl", "ppl vs f16")
    print(f"{'cache':6} " + " ".join(f"{h:>11}" for h in heads))
    for cache, r in rows.items():
        growth = r["rss_after_mib"] - r["rss_loaded_mib"]
        ppl, base_ppl = math.exp(r["nll"]), math.exp(base["nll"])
        cells = (
            f"{r['rss_loaded_mib']:.0f} MiB", f"{r['rss_after_mib']:.0f} MiB", f"{growth:.0f} MiB",
            f"{r['prefill_s']:.2f}", f"{r['decode_tps']:.1f}", f"{r['decode_tps'] / base['decode_tps']:.2f}x",
            f"{ppl:.3f}", f"{100 * (ppl / base_ppl - 1):+.2f}%",
        )  # fmt: skip
        print(f"{cache:6} " + " ".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    main()
