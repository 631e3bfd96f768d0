"""Prefix reuse and chunked prefill on the transformers engine (engine/backends/prefix.py and the
runner in transformers.py), on the embedded model in float32: greedy replies that reuse kept
keys and values equal cold runs, bit for bit in their tokens."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from llmhost.config import LoadSettings
from llmhost.engine import GenerationParams, load
from llmhost.engine.backends.prefix import Entry, PrefixCache
from llmhost.engine.request import GenerationRequest
from runners import greedy
from servers import wait_for

TURNS = [
    "Tell me about Paris.",
    "And what about its museums?",
    "Which one is the biggest?",
    "How do I get there by metro?",
]


@pytest.fixture(scope="module")
def hf(embedded_dir):
    engine = load(None, LoadSettings(engine="transformers", dtype="float32"))
    yield engine
    engine.close()


def _settled(engine) -> bool:
    """Nothing runs and the idle work (finished replies made reusable) is done."""
    runner = engine.scheduler.runner
    return wait_for(lambda: engine.running == 0 and not runner._redo and runner._redoing is None, timeout=60)


def _cold(engine, messages, params):
    """The reply with nothing kept."""
    assert wait_for(lambda: engine.running == 0, timeout=30)
    engine.scheduler.call(engine.scheduler.runner.forget)  # on the inference thread
    return engine.generate(GenerationRequest(messages, params))


def test_a_conversations_turns_reuse_the_last_reply_and_equal_cold_runs(hf) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=70)
    conversation, cached = [], []
    for question in TURNS:
        conversation.append({"role": "user", "content": question})
        assert _settled(hf)
        warm = hf.generate(GenerationRequest(conversation, params))
        cold = _cold(hf, conversation, params)
        assert warm.token_ids == cold.token_ids, question
        assert cold.cached_tokens == 0
        cached.append((warm.cached_tokens, warm.prompt_tokens))
        conversation.append({"role": "assistant", "content": warm.text})
    assert all(c % 64 == 0 and c < p for c, p in cached), cached
    assert all(p - c < 64 + 40 for c, p in cached[1:]), cached  # the reply was reused, not re-prefilled
    # the same prompt again (a retry): nothing to evaluate before the first token
    retry = hf.generate(GenerationRequest(conversation[:-1], params))
    assert retry.cached_tokens == retry.prompt_tokens and retry.text == conversation[-1]["content"]


def test_shared_system_prompts_interleaved_and_edited_conversations_equal_cold_runs(hf) -> None:
    system = {"role": "system", "content": "You are a travel guide for Europe. " * 20}
    params = GenerationParams(temperature=0, max_new_tokens=16)
    a = [system, {"role": "user", "content": "Tell me about Rome."}]
    b = [system, {"role": "user", "content": "Tell me about Vienna."}]
    cold = {id(m): _cold(hf, m, params).token_ids for m in (a, b)}
    # one after the other: float32 matrix products are not batch-invariant on the CPU (a row's
    # last bits depend on how many rows decode with it), so a reply decoded beside another one
    # may differ from a cold solo run for reasons that have nothing to do with reuse
    warm = [hf.generate(GenerationRequest(m, params)) for m in (a, b, a, b)]
    assert [w.token_ids for w in warm] == [cold[id(a)], cold[id(b)]] * 2
    assert max(w.cached_tokens for w in warm) >= 128  # the system prompt's blocks were shared
    edited = [{**system, "content": system["content"].replace("Europe", "Asia", 1)}, a[1]]
    reply = hf.generate(GenerationRequest(edited, params))
    assert reply.token_ids == _cold(hf, edited, params).token_ids and reply.cached_tokens < 64


def test_the_kept_memory_never_passes_its_bound(hf, embedded_dir) -> None:
    default = hf.scheduler.runner.prefix.max_bytes  # 1 GiB, at most a quarter of what is free
    assert 0 < default <= 2**30
    bound_gib = 0.02  # ≈ 450 tokens of the embedded model's float32 keys and values
    engine = load(None, LoadSettings(engine="transformers", dtype="float32", kv_cache_gib=bound_gib))
    try:
        runner = engine.scheduler.runner
        params = GenerationParams(temperature=0, max_new_tokens=4)
        seen = []
        for i in range(6):
            engine.generate(
                GenerationRequest(
                    [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * 20}], params
                )
            )
            seen.append((runner.prefix.nbytes, len(runner.prefix)))
            assert runner.prefix.nbytes <= bound_gib * 2**30
        assert max(n for _, n in seen) >= 2 and seen[-1][1] < 6  # entries were kept, old ones evicted
    finally:
        engine.close()


def test_a_long_prompt_admitted_mid_stream_pauses_the_other_for_a_chunk_at_most(hf) -> None:
    runner = hf.scheduler.runner
    long_chat = [{"role": "user", "content": "Summarize this. " + "The river runs to the sea. " * 90}]
    assert len(hf.encode_chat(long_chat)) > 4 * runner.chunk
    params = GenerationParams(temperature=0, max_new_tokens=1)  # from the prefill alone: no batched step
    reference = _cold(hf, long_chat, params).text
    arrivals: list[float] = []
    measured = threading.Event()

    def running_stream() -> None:
        story = [{"role": "user", "content": "Write a long story about a ship."}]
        for _ in hf.stream(GenerationRequest(story, GenerationParams(temperature=0, max_new_tokens=120))):
            arrivals.append(time.perf_counter())
            if measured.is_set():  # leaving the stream cancels it: the rest would measure nothing
                break

    assert wait_for(lambda: hf.running == 0, timeout=30)
    hf.scheduler.call(runner.forget)
    thread = threading.Thread(target=running_stream)
    thread.start()
    assert wait_for(lambda: len(arrivals) >= 5, timeout=60)
    started = time.perf_counter()
    reply = hf.generate(GenerationRequest(long_chat, params))
    ended = time.perf_counter()
    measured.set()
    thread.join()
    during = [b - a for a, b in itertools.pairwise(arrivals) if started <= b <= ended]
    assert reply.text == reference and reply.cached_tokens == 0
    assert during, "the running stream made no progress while the long prompt was prefilled"
    assert max(during) < reply.ttft_s / 3, (max(during), reply.ttft_s)


def test_prefix_cache_finds_whole_blocks_and_evicts_oldest_first() -> None:
    import torch

    def entry(tokens, logits=None, adapter=None):
        kv = torch.zeros(1, 1, len(tokens), 2)
        return Entry(list(tokens), [(kv, kv.clone())], adapter, logits)

    cache = PrefixCache(max_bytes=3 * 200 * 16, block=8)  # three entries of 200 tokens
    cache.put(entry(range(200), logits=torch.zeros(3)))
    assert cache.find(list(range(200)), None)[1] == 200  # the very prompt, with its logits
    assert cache.find([*range(100), 7, 7], None)[1] == 96  # whole blocks of the shared 100
    assert cache.find(list(range(100)), "an-adapter") == (None, 0)  # made with another adapter
    assert cache.find(list(range(16)), None)[1] == 8  # at least one token left to evaluate
    cache.put(entry(range(1000, 1200)))
    cache.put(entry(range(2000, 2200)))
    cache.find(list(range(50)), None)  # used: now the most recent
    cache.put(entry(range(3000, 3200)))
    assert cache.find(list(range(1000, 1100)), None)[1] == 0  # the least recently used went
    assert cache.find(list(range(50)), None)[1] == 48 and cache.nbytes <= cache.max_bytes
    cache.put(entry(range(3000, 3300)))  # extends an entry without logits: that one is replaced,
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes  # and the oldest makes room
    assert cache.find(list(range(2000, 2100)), None)[1] == 0
    assert cache.find(list(range(3000, 3300)), None)[1] == 296


def test_a_request_arriving_during_idle_work_stops_it_and_nothing_is_lost(hf) -> None:
    """Idle work (a reply made reusable) stops at the next layer when a request arrives: the
    half-evaluated cache is dropped and the job stays queued; done later, the next turn's first
    logits from what it kept equal a cold runner's exactly."""
    import torch

    from llmhost.engine.backends.transformers import TransformersRunner

    assert wait_for(lambda: hf.running == 0, timeout=30)
    warm = TransformersRunner(hf.model, hf._cache_kw, 2, 2**30)
    cold = TransformersRunner(hf.model, hf._cache_kw, 2, 2**30)
    prompt = hf.encode_chat([{"role": "user", "content": "Tell me about Lisbon."}])
    with torch.inference_mode():
        reply, _ = greedy(warm, prompt, 150)
        assert len(warm._redo) == 1
        assert warm.idle_work(lambda: True) and len(warm._redo) == 1 and warm._redoing is None
        while warm.idle_work(lambda: False):
            pass
        turn = [*prompt, *reply, *hf.encode_chat([{"role": "user", "content": "Why?"}])[1:]]
        entry, shared = warm.prefix.find(turn, None)
        assert shared == (len(prompt) + len(reply)) // 64 * 64 and entry.logits is None
        assert torch.equal(greedy(warm, turn, 1)[1], greedy(cold, turn, 1)[1])


def test_the_fast_prefix_cache_keeps_decoded_rows_of_a_padded_batch_as_they_are(hf) -> None:
    """`--prefix-cache fast`: a finished request's decoded keys and values are kept as they are
    and shared token by token, taken from its row of the left-padded batch. Two conversations
    of different lengths decode together; each one's next turn, sent at once, keeps its prompt
    and whole reply and evaluates only the new message, its logits a cold run's within float
    noise; nothing is queued for idle work."""
    from types import SimpleNamespace

    import torch

    from llmhost.engine.backends.transformers import TransformersRunner

    assert wait_for(lambda: hf.running == 0, timeout=30)
    fast = TransformersRunner(hf.model, hf._cache_kw, 2, 2**30, exact=False)
    cold = TransformersRunner(hf.model, hf._cache_kw, 2, 2**30)
    prompts = [
        hf.encode_chat([{"role": "user", "content": "Tell me about Lisbon."}]),
        hf.encode_chat(
            [{"role": "system", "content": "Be brief. " * 20}, {"role": "user", "content": "Hi!"}]
        ),
    ]
    reqs = [
        SimpleNamespace(prompt_ids=p, seq=SimpleNamespace(cached_tokens=0), adapter=None) for p in prompts
    ]
    replies: list[list[int]] = [[], []]
    with torch.inference_mode():
        for req in reqs:
            req.last_token = int(fast.prefill(req).argmax())
            fast.commit_prefill()
        for _ in range(40):
            for req, reply in zip(reqs, replies, strict=True):
                reply.append(req.last_token)
            logits = fast.step(reqs)
            for req, row in zip(reqs, logits, strict=True):
                req.last_token = int(row.argmax())
        fast.drop([])
        assert not fast._redo and not fast.idle_work(lambda: False)
        question = hf.encode_chat([{"role": "user", "content": "Why?"}])[1:]
        for prompt, reply in zip(prompts, replies, strict=True):
            turn = [*prompt, *reply, *question]
            entry, shared = fast.prefix.find(turn, None)
            assert shared == len(prompt) + len(reply) and entry.logits is None
            warm_first, cold_first = greedy(fast, turn, 1)[1], greedy(cold, turn, 1)[1]
            assert float((warm_first - cold_first).abs().max()) < 1e-2  # padding or a wrong row: far off
            cold.forget()
