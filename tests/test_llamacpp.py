"""The llama.cpp engine on the embedded GGUF (no conversion), through the same chunk type,
parameters and scheduler as the transformers engine. Needs `pip install llmhost[llamacpp]`."""

from __future__ import annotations

import ctypes
import itertools
import threading
import time

import pytest

from llmhost.config import LoadSettings
from llmhost.engine import load
from llmhost.engine.backends.llamacpp import INSTALL, available
from llmhost.engine.params import GenerationParams
from llmhost.engine.request import GenerationRequest
from llmhost.errors import ContextOverflowError, LlmhostError
from servers import wait_for

pytestmark = pytest.mark.skipif(not available(), reason=f"llama-cpp-python is not installed: {INSTALL}")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def cpp():
    engine = load(None, LoadSettings(engine="llamacpp", context_length=2048))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def blocks():
    """The engine with ggml's default kernels: the exact scheme that K-quants get (whole blocks,
    replies made reusable while idle), here on the embedded model; and with the weight repack
    off (`cpp` has it as this CPU was found to run it)."""
    settings = LoadSettings(
        engine="llamacpp", context_length=2048, reference_kernels=False, weight_repack="off"
    )
    engine = load(None, settings)
    assert engine.scheduler.runner.reuse.invariant is False
    yield engine
    engine.close()


@pytest.fixture(params=["reference", "blocks"])
def either(request):
    """Each exact scheme in turn: reference kernels (the embedded model's) and whole blocks."""
    return request.getfixturevalue("cpp" if request.param == "reference" else "blocks")


def test_greedy_equals_the_bindings_own_sampler(cpp) -> None:
    """llmhost samples from llama.cpp's logits; under greedy decoding that must give exactly what
    llama-cpp-python's own sampler gives. (Its Q4_1 kernels answer differently from the float32
    transformers model: this 135M model is that sensitive.)"""
    from llmhost.engine.backends.llamacpp.repack import open_model
    from llmhost.store.embedded import embedded_gguf

    result = cpp.generate(GenerationRequest(QUESTION, GenerationParams(temperature=0, max_new_tokens=20)))
    # the binding's own single-sequence context, with the window, batch size and weight repack
    # llmhost uses (the repack is what this CPU was found to run)
    repack = bool(cpp.llm.model_params.use_extra_bufts)
    llm = open_model(embedded_gguf()[0], repack, n_ctx=2048, n_batch=512, flash_attn=True)
    native = []
    for tok in llm.generate(cpp.encode_chat(QUESTION), temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if tok in cpp.eos_ids or len(native) == 20:
            break
        native.append(tok)
    assert result.token_ids[: len(native)] == native and result.text.strip()
    assert result.prompt_tokens == len(cpp.encode_chat(QUESTION)) and result.completion_tokens == len(
        result.token_ids
    )
    assert result.ttft_s is not None and result.decode_tps and result.decode_tps > 0
    assert cpp.name == "smollm2-135m-instruct" and cpp.context_length == 2048


def test_the_engine_answers_with_the_weight_repack_off_and_on(cpp, blocks) -> None:
    """The real engine loads with ggml's extra buffer types forced off (`blocks`) and, where this
    CPU runs them (store/probes.py: everywhere but where AMX faults), on (`cpp`): both answer."""
    from llmhost.store.probes import repack_decision

    params = GenerationParams(temperature=0, max_new_tokens=12)
    assert blocks.llm.model_params.use_extra_bufts is False
    assert blocks.generate(GenerationRequest(QUESTION, params)).text.strip()
    decision = repack_decision("auto")  # `cpp` decided (and probed, on an AMX CPU) at its load
    if not decision.use:
        pytest.skip(f"the weight repack is off on this machine: {decision.reason}")
    assert cpp.llm.model_params.use_extra_bufts is True
    assert cpp.generate(GenerationRequest(QUESTION, params)).text.strip()


def test_stream_equals_generate_and_is_deterministic(cpp) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=24)
    whole = cpp.generate(GenerationRequest(STORY, params))
    parts = list(cpp.stream(GenerationRequest(STORY, params)))
    assert "".join(c.text for c in parts) == whole.text == cpp.generate(GenerationRequest(STORY, params)).text
    assert parts[-1].finish_reason == "length" and parts[-1].completion_tokens == 24


def test_seeded_sampling_repeats(cpp) -> None:
    params = GenerationParams(temperature=0.9, top_p=0.95, seed=1234, max_new_tokens=16)
    assert (
        cpp.generate(GenerationRequest(STORY, params)).text
        == cpp.generate(GenerationRequest(STORY, params)).text
    )


def test_stop_strings_never_leak(cpp) -> None:
    full = cpp.generate(GenerationRequest(STORY, GenerationParams(temperature=0, max_new_tokens=40))).text
    stop = full.split()[4]
    cut = cpp.generate(
        GenerationRequest(STORY, GenerationParams(temperature=0, max_new_tokens=40, stop=[stop]))
    )
    assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"


def test_cancel(cpp) -> None:
    cancel = threading.Event()
    seen = []
    for chunk in cpp.stream(
        GenerationRequest(STORY, GenerationParams(temperature=0, max_new_tokens=400), cancel=cancel)
    ):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 100
    assert wait_for(lambda: cpp.running == 0, 2)  # the slot is freed at the next step


def test_concurrent_requests_decode_together_and_equal_solo(cpp) -> None:
    """llama.cpp's multi-sequence batching: several requests per decode call, each in a KV window
    of its own, so a reply does not depend on what else is running."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [STORY, QUESTION, [{"role": "user", "content": "Name three animals."}], STORY]
    params = GenerationParams(temperature=0, max_new_tokens=32)
    solo = [cpp.generate(GenerationRequest(p, params)).token_ids for p in prompts]
    cpp.scheduler.peak_batch = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: cpp.generate(GenerationRequest(p, params)).token_ids, prompts))
    assert together == solo
    assert cpp.scheduler.peak_batch >= 3


def test_logits_do_not_depend_on_other_sequences_in_the_cache(cpp) -> None:
    """A request's logits, teacher-forced, are bit-identical alone and beside others that start
    before it, finish while it decodes, and whose slots are taken over (their cells freed) by
    new requests while it decodes. (In one cache shared by all sequences they were off by up to
    1.5: see LlamaCppRunner.)"""
    from types import SimpleNamespace

    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores

    def request(text: str, budget: int = 64) -> SimpleNamespace:
        ids = cpp.encode_chat([{"role": "user", "content": text}])
        return SimpleNamespace(
            prompt_ids=ids,
            seq=SimpleNamespace(params=SimpleNamespace(max_new_tokens=budget), cached_tokens=0),
            adapter=None,
        )

    runner = LlamaCppRunner(cpp.llm, 1024, 3, physical_cores())  # three slots: all taken below
    try:
        a = request("What is the capital of France?")
        alone = [runner.prefill(a)]
        runner.commit_prefill()
        forced = [int(alone[0].argmax())]
        for _ in range(20):
            a.last_token = forced[-1]
            alone.append(runner.step([a])[0])
            forced.append(int(alone[-1].argmax()))
        runner.drop([])
        runner.forget()
        rows = [request("Write a story about a dragon. " * 8), request("Count to ten.")]
        for other in rows:
            other.last_token = int(runner.prefill(other).argmax())
            runner.commit_prefill()
        beside = [runner.prefill(a)]
        runner.commit_prefill()
        rows.append(a)
        for i in range(20):
            a.last_token = forced[i]
            logits = runner.step(rows)
            beside.append(logits[rows.index(a)])
            for row, other in enumerate(rows):
                if other is not a:
                    other.last_token = int(logits[row].argmax())
            if i == 5:  # the dragon story ends while the others decode
                runner.drop([1, 2])
                rows = rows[1:]
            if i == 8:  # a new request takes the only free slot over: the story's cells are freed
                newcomer = request("Name three rivers.")
                newcomer.last_token = int(runner.prefill(newcomer).argmax())
                runner.commit_prefill()
                rows.append(newcomer)
        assert max(float((x - y).abs().max()) for x, y in zip(alone, beside, strict=True)) == 0.0
    finally:
        runner.close()


def _cold(engine, messages, params):
    """The reply with nothing in the prompt cache."""
    assert wait_for(lambda: engine.running == 0, timeout=10)
    engine.scheduler.call(engine.scheduler.runner.forget)  # on the inference thread, between steps
    return engine.generate(GenerationRequest(messages, params))


TURNS = [
    "Tell me about Paris.",
    "And what about its museums?",
    "Which one is the biggest?",
    "How do I get there by metro?",
    "What else should I see nearby?",
    "Thanks! Any food tips?",
]


def _runs(slots: set[int]) -> int:
    """How many runs of consecutive slots there are (llama.cpp evaluates each as a micro-batch)."""
    return sum(1 for s in slots if s - 1 not in slots)


def _settled(engine) -> bool:
    """Nothing runs and the idle work (finished replies made reusable) is done."""
    return wait_for(lambda: engine.running == 0 and not engine.scheduler.runner.redo, timeout=30)


def test_a_conversations_next_turn_reuses_its_prefix_and_equals_a_cold_run(either) -> None:
    """Each turn prefills only the new question (and, with whole blocks, the rest of the last
    block) and still equals a cold run: the previous reply's decoded cells are a cold run's
    (reference kernels), or the reply was evaluated again as prompt blocks while idle."""
    params = GenerationParams(temperature=0, max_new_tokens=80)
    conversation, cached = [], []
    for question in TURNS[:4]:  # ≈500 tokens by the last: past the ≈256 cells where attention splits
        conversation.append({"role": "user", "content": question})
        assert _settled(either)
        warm = either.generate(GenerationRequest(conversation, params))
        cold = _cold(either, conversation, params)
        assert warm.token_ids == cold.token_ids, question
        assert cold.cached_tokens == 0
        cached.append((warm.cached_tokens, warm.prompt_tokens))
        conversation.append({"role": "assistant", "content": warm.text})
        # the cold run left this turn in the cache (and its reply is made reusable): the next
        # turn starts from it, as it would have from the warm one's
    assert all(c < p for c, p in cached)
    question_tokens = 40  # the template's turn markers and a short question
    assert all(p - c < 64 + question_tokens for c, p in cached[1:]), cached  # the reply was reused
    if either.scheduler.runner.reuse.invariant:  # all of it, its last partial block too
        assert all(p - c < question_tokens for c, p in cached[1:]), cached


def test_the_same_prompt_again_starts_from_its_kept_logits(cpp) -> None:
    """A retry or a regenerated reply: the slot still holds the prompt, so nothing is
    evaluated before the first token, and the reply is the same."""
    params = GenerationParams(temperature=0, max_new_tokens=12)
    first = _cold(cpp, QUESTION, params)
    assert _settled(cpp)
    again = cpp.generate(GenerationRequest(QUESTION, params))
    assert again.token_ids == first.token_ids and again.cached_tokens == again.prompt_tokens
    sampled = GenerationParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12)
    assert (
        cpp.generate(GenerationRequest(QUESTION, sampled)).token_ids
        == _cold(cpp, QUESTION, sampled).token_ids
    )


def test_a_new_question_after_the_same_short_prefix_reuses_it_token_by_token(blocks) -> None:
    """Short prompts lie in their first, partial block. This model's rows are independent below
    64 (measured at load: `granular`), so a new prompt reuses the tokens it shares with the
    slot's partial block (the template's default system prompt), not only whole blocks, and
    still equals a cold run. Without that measurement only whole blocks are reused."""
    params = GenerationParams(temperature=0, max_new_tokens=16)
    runner = blocks.scheduler.runner
    assert runner.reuse.granular  # Q4_1: llama.cpp's CPU kernels give a row the same numbers below 64 rows
    first = [{"role": "user", "content": "Hi! I am visitor 1."}]
    second = [{"role": "user", "content": "Hi! I am visitor 2, from Lisbon."}]
    _cold(blocks, first, params)
    reply = blocks.generate(GenerationRequest(second, params))
    assert 0 < reply.cached_tokens < reply.prompt_tokens and reply.cached_tokens % 64, reply.cached_tokens
    assert reply.token_ids == _cold(blocks, second, params).token_ids
    assert wait_for(lambda: blocks.running == 0, timeout=10)
    held, ids = blocks.encode_chat(second), blocks.encode_chat(first)  # the slot holds the cold run's
    slot = next(s for s in range(runner.max_batch) if runner.slots[s].tokens[: len(held)] == held)
    n = next(i for i, (x, y) in enumerate(zip(held, ids, strict=False)) if x != y)
    assert runner.reuse.reusable(runner.slots[slot], ids, n, None) == n
    runner.reuse.granular = False
    try:
        assert runner.reuse.reusable(runner.slots[slot], ids, n, None) == 0  # whole blocks only
    finally:
        runner.reuse.granular = True


def test_a_short_reply_in_a_partial_block_is_made_again_and_the_next_turn_reuses_all_of_it(blocks) -> None:
    """Rows being independent below 64 (`granular`), the idle work evaluates a reply's last,
    partial block again too: a next turn whose prompt ends in that same block (short turns)
    prefills only its new message, and still equals a cold run."""
    params = GenerationParams(temperature=0, max_new_tokens=6)
    conversation = [{"role": "user", "content": "Hi!"}]
    first = _cold(blocks, conversation, params)
    conversation += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Ok."}]
    assert _settled(blocks)
    warm = blocks.generate(GenerationRequest(conversation, params))
    assert warm.prompt_tokens < 64  # one partial block: before, only its prompt part was reused
    assert warm.cached_tokens > first.prompt_tokens, (warm.cached_tokens, first.prompt_tokens)
    assert warm.cached_tokens >= first.prompt_tokens + len(first.token_ids) - 1
    assert warm.token_ids == _cold(blocks, conversation, params).token_ids


def test_a_conversation_goes_on_in_its_own_slot_and_short_prompts_keep_theirs(blocks) -> None:
    """Each next turn, even sent the moment the reply ends, decodes in the slot that holds the
    turn before (it loses only the tail of the reply it carries on from): no copies of stale
    turns in other slots, so the slots holding short prompts keep them, and a new short
    prompt after a long chat still reuses the system prompt in their partial block."""
    runner = blocks.scheduler.runner
    params = GenerationParams(temperature=0, max_new_tokens=60)
    _cold(blocks, [{"role": "user", "content": "Hi! I am visitor 1."}], GenerationParams(max_new_tokens=4))
    conversation = []
    for turn, question in enumerate(TURNS[:5]):
        conversation.append({"role": "user", "content": question})
        reply = blocks.generate(GenerationRequest(conversation, params))  # no waiting for the idle work
        conversation.append({"role": "assistant", "content": reply.text})
        if turn == 0:  # the next turn comes while the reply is being made again (half done)
            assert wait_for(
                lambda: any(len(runner.slots[s].tokens) < len(t) for s, t in runner.redo.items()), 10
            )
    assert _settled(blocks)  # replies made again in other slots would show now
    assert sum(len(held) > 64 for held in (slot.tokens for slot in runner.slots)) == 1, [
        len(slot.tokens) for slot in runner.slots
    ]
    new = [{"role": "user", "content": "Hi! I am visitor 2, from Lisbon."}]
    assert blocks.generate(GenerationRequest(new, GenerationParams(max_new_tokens=4))).cached_tokens > 0


def test_shared_system_prompts_interleaved_and_edited_conversations_equal_cold_runs(cpp) -> None:
    from concurrent.futures import ThreadPoolExecutor

    system = {"role": "system", "content": "You are a travel guide for Europe. " * 30}
    params = GenerationParams(temperature=0, max_new_tokens=24)
    a = [system, {"role": "user", "content": "Tell me about Rome."}]
    b = [system, {"role": "user", "content": "Tell me about Vienna."}]
    cold = {id(m): _cold(cpp, m, params).token_ids for m in (a, b)}
    with ThreadPoolExecutor(2) as pool:  # two conversations at once, each in a slot
        warm = list(pool.map(lambda m: cpp.generate(GenerationRequest(m, params)), [a, b, a, b]))
    assert [w.token_ids for w in warm] == [cold[id(a)], cold[id(b)]] * 2
    assert max(w.cached_tokens for w in warm) >= 128  # the system prompt's blocks were shared
    # another conversation with the same system prompt works on a copy of the first one's
    # stream: both stay cached, and the first one's prompt is still whole for a retry
    assert _cold(cpp, a, params).token_ids == cold[id(a)]
    branch = cpp.generate(GenerationRequest(b, params))
    assert branch.token_ids == cold[id(b)] and branch.cached_tokens >= 128
    retry = cpp.generate(GenerationRequest(a, params))
    assert retry.token_ids == cold[id(a)] and retry.cached_tokens == retry.prompt_tokens
    # a conversation edited in the middle: only the blocks before the edit are reused
    edited = [{**system, "content": system["content"].replace("Europe", "Asia", 1)}, a[1]]
    reply = cpp.generate(GenerationRequest(edited, params))
    assert reply.token_ids == _cold(cpp, edited, params).token_ids and reply.cached_tokens < 64


def test_sustained_load_never_waits_while_a_slot_is_free() -> None:
    """Clients streaming continuously: a finished request's slot is free at once (no cache to
    drain first, as when finished sequences' cells had to stay until the cache went idle), so
    the scheduler never turns a request away while fewer than --max-concurrency run."""
    engine = load(None, LoadSettings(engine="llamacpp", max_concurrency=4, context_length=1024))
    runner = engine.scheduler.runner
    refused, asked = [], []
    has_room = runner.has_room

    def watched(req) -> bool:
        ok = has_room(req)
        asked.append(len(engine.scheduler._active))
        if not ok and len(engine.scheduler._active) < runner.max_batch:
            refused.append(len(engine.scheduler._active))
        return ok

    runner.has_room = watched
    stop = threading.Event()
    params = GenerationParams(temperature=0.7, max_new_tokens=48)
    done = itertools.count(1)

    def client(i: int) -> None:
        while not stop.is_set():
            engine.generate(
                GenerationRequest(
                    [{"role": "user", "content": f"Say something about the number {i}."}], params
                )
            )
            if next(done) >= 16:  # each slot freed and taken again several times
                stop.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]  # more than the slots
    for t in threads:
        t.start()
    try:
        stop.wait(120)
    finally:
        stop.set()
        for t in threads:
            t.join()
        peak = engine.scheduler.peak_batch
        engine.close()
    assert asked and not refused and peak == 4


def test_slots_and_their_size_bound_the_cache(cpp) -> None:
    from llmhost.engine.backends.llamacpp import DEFAULT_SLOT_TOKENS, kv_bytes_per_token, slot_tokens

    per_token = kv_bytes_per_token(cpp.llm)
    assert per_token == 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16
    assert slot_tokens(cpp.llm, 8192, False, None, 8) == DEFAULT_SLOT_TOKENS  # a default window
    assert slot_tokens(cpp.llm, 8192, True, None, 8) == 8192  # --context-length asked for it
    assert slot_tokens(cpp.llm, 8192, False, 1, 8) == 2**30 // per_token // 8  # what 1 GiB buys, shared
    assert slot_tokens(cpp.llm, 2048, False, 1, 8) == 2048  # never more than the window
    with pytest.raises(LlmhostError, match="raise --kv-cache-gib or lower --max-concurrency"):
        slot_tokens(cpp.llm, 8192, False, 0.001, 8)
    # 2 slots: two requests run, the third waits; a prompt beyond a slot is a clear 400
    small = LoadSettings(engine="llamacpp", context_length=512, max_concurrency=2)
    engine = load(None, small)
    try:
        assert engine.context_length == 512 and engine.scheduler.runner.max_batch == 2
        params = GenerationParams(temperature=0, max_new_tokens=400 - len(engine.encode_chat(STORY)))
        streams = [engine.stream(GenerationRequest(STORY, params)) for _ in range(3)]
        firsts = [next(s).text for s in streams[:2]] + [""]
        assert engine.running == 2 and engine.queued == 1  # in /metrics as llmhost_queue_length
        texts = {first + "".join(c.text for c in s) for first, s in zip(firsts, streams, strict=True)}
        assert len(texts) == 1  # the one that waited got the same reply
        with pytest.raises(ContextOverflowError):
            engine.generate(GenerationRequest([{"role": "user", "content": "word " * 600}], params))
    finally:
        engine.close()


def test_raw_prompt_and_chinese(cpp) -> None:
    text = cpp.generate(
        GenerationRequest(params=GenerationParams(temperature=0, max_new_tokens=8), prompt="Once upon a time")
    ).text
    assert text.strip()
    reply = cpp.generate(
        GenerationRequest(
            [{"role": "user", "content": "你好"}], GenerationParams(temperature=0, max_new_tokens=16)
        )
    )
    assert "\ufffd" not in reply.text


def test_serve_with_llamacpp_through_the_official_client() -> None:
    from servers import LocalServer, metric

    server = LocalServer("--engine", "llamacpp", "--context-length", "2048")
    try:
        client = server.client()
        kw = {"model": "smollm2-135m-instruct", "messages": QUESTION, "temperature": 0, "max_tokens": 12}
        whole = client.chat.completions.create(**kw)
        parts = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        ]
        assert "".join(parts) == whole.choices[0].message.content and whole.usage.completion_tokens <= 12
        # a long shared system prompt: the next request reuses its blocks, and says so; the
        # same prompt again reuses all of it
        system = {"role": "system", "content": "Answer briefly and kindly. " * 40}
        long = [system, *QUESTION]
        first = client.chat.completions.create(**{**kw, "messages": long})
        other = client.chat.completions.create(
            **{**kw, "messages": [system, {"role": "user", "content": "Name a river."}]}
        )
        again = client.chat.completions.create(**{**kw, "messages": long})
        assert first.usage.prompt_tokens_details.cached_tokens < 8  # the template's opening (QUESTION's)
        shared = other.usage.prompt_tokens_details.cached_tokens
        assert shared >= 192  # the system prompt: its whole blocks, and the part in the last one
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == again.usage.prompt_tokens == first.usage.prompt_tokens
        assert again.choices[0].message.content == first.choices[0].message.content
        with server.http() as http:
            text = http.get("/metrics").text
        assert metric(text, "llmhost_queue_length") == 0
        assert metric(text, "llmhost_prompt_tokens_cached_total") >= cached + shared
    finally:
        assert server.stop() == 0, server.log


def test_a_long_prompt_admitted_mid_stream_pauses_the_others_for_a_chunk_at_most(cpp) -> None:
    """A 1,500-token prompt prefills in chunks of PREFILL_CHUNK tokens with decode steps of the
    running streams in between: a running stream's longest pause is about one chunk, not the
    whole prefill; the long request's reply is the same as a cold run's (the same blocks)."""
    from llmhost.engine.backends.llamacpp import PREFILL_CHUNK

    greedy = GenerationParams(temperature=0, max_new_tokens=200)
    long_chat = [{"role": "user", "content": "Summarize this. " + "The river runs to the sea. " * 230}]
    prompt_tokens = len(cpp.encode_chat(long_chat))
    assert 1300 < prompt_tokens < 1900 and prompt_tokens > 8 * PREFILL_CHUNK
    # one token, from the prefill alone: decoded beside the running stream, llama.cpp takes
    # another attention path than alone past ≈256 tokens (README: not batch-invariant)
    first_token = GenerationParams(temperature=0, max_new_tokens=1)
    reference = _cold(cpp, long_chat, first_token).text
    arrivals: list[float] = []
    measured = threading.Event()

    def running_stream() -> None:
        for _ in cpp.stream(
            GenerationRequest([{"role": "user", "content": "Write a long story about a ship."}], greedy)
        ):
            arrivals.append(time.perf_counter())
            if measured.is_set():  # leaving the stream cancels it: the rest would measure nothing
                break

    assert wait_for(lambda: cpp.running == 0, timeout=10)
    cpp.scheduler.call(cpp.scheduler.runner.forget)  # the long prompt prefills from scratch
    thread = threading.Thread(target=running_stream)
    thread.start()
    assert wait_for(lambda: len(arrivals) >= 10, timeout=30)
    started = time.perf_counter()
    long_reply = cpp.generate(GenerationRequest(long_chat, first_token))
    prefill_s = long_reply.ttft_s  # the whole prompt's prefill, interleaved with the other's steps
    ended = time.perf_counter()
    measured.set()
    thread.join()
    during = [b - a for a, b in itertools.pairwise(arrivals) if started <= b <= ended]
    assert long_reply.text == reference and long_reply.cached_tokens == 0
    assert during, "the running stream made no progress while the long prompt was prefilled"
    assert max(during) < prefill_s / 4, (max(during), prefill_s)


def test_a_request_arriving_during_idle_work_aborts_it_and_nothing_is_lost(cpp) -> None:
    """A block of idle work (a reply made reusable) is aborted inside llama.cpp when a request
    arrives: llama.cpp removes the block's cells and the job stays; done later, the next turn's
    first logits from what it kept equal a cold runner's exactly."""
    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores
    from llmhost.engine.backends.llamacpp.slots import choose
    from runners import greedy

    warm = LlamaCppRunner(cpp.llm, 1024, 2, physical_cores(), reference=False)  # K-quants' scheme
    cold = LlamaCppRunner(cpp.llm, 1024, 2, physical_cores(), reference=False)
    try:
        prompt = cpp.encode_chat([{"role": "user", "content": "Tell me about Lisbon."}])
        reply, _ = greedy(warm, prompt, 150)
        (slot,) = warm.redo
        assert warm.idle_work(lambda: True) and slot in warm.redo
        assert len(warm.slots[slot].tokens) == len(prompt) // 64 * 64  # the aborted block's cells are gone
        while warm.idle_work(lambda: False):
            pass
        turn = [*prompt, *reply, *cpp.encode_chat([{"role": "user", "content": "Why?"}])[1:]]
        assert choose(warm.slots, turn, None, warm.reuse)[1] == (len(prompt) + len(reply)) // 64 * 64
        assert bool((greedy(warm, turn, 1)[1] == greedy(cold, turn, 1)[1]).all())
    finally:
        warm.close()
        cold.close()


def test_the_fast_prefix_cache_reuses_a_reply_as_decoded_with_no_idle_work(cpp) -> None:
    """`--prefix-cache fast`: a finished reply's decoded cells are reused as they are, token by
    token, as llama-server does. A next turn sent at once keeps the prompt and the whole reply
    and evaluates only its new message; nothing is queued for idle work. Its logits are a cold
    run's within float noise, not bit for bit (that is what the exact default is for)."""
    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores
    from llmhost.engine.backends.llamacpp.slots import choose
    from runners import greedy

    fast = LlamaCppRunner(cpp.llm, 1024, 2, physical_cores(), exact=False)
    cold = LlamaCppRunner(cpp.llm, 1024, 2, physical_cores())
    try:
        prompt = cpp.encode_chat([{"role": "user", "content": "Tell me about Lisbon."}])
        reply, _ = greedy(fast, prompt, 150)
        assert not fast.redo and not fast.idle_work(lambda: False)
        question = cpp.encode_chat([{"role": "user", "content": "Why?"}])[1:]
        turn = [*prompt, *reply, *question]
        assert choose(fast.slots, turn, None, fast.reuse)[1] == len(prompt) + len(
            reply
        )  # not a whole number of blocks
        warm_first, cold_first = greedy(fast, turn, 1)[1], greedy(cold, turn, 1)[1]
        assert float((warm_first - cold_first).abs().max()) < 2.0  # wrong cells are off by 10s
        assert int(cold_first.argmax()) in warm_first.topk(3).indices.tolist()
        # the same prompt again: its kept logits, as in the exact mode
        assert choose(fast.slots, turn, None, fast.reuse)[1] == len(turn)
    finally:
        fast.close()
        cold.close()


def test_reference_kernels_make_a_replys_decoded_cells_those_of_a_cold_run(cpp) -> None:
    """The exact default on the embedded model (Q4_1): ggml's reference kernels compute every
    position alike in any batch (measured at load: `invariant`), so a finished reply's cells,
    decoded one token at a time past 256 cells (where the default kernels split a lone row's
    attention between the threads), are reused as they are: a next turn sent at once keeps
    prompt and reply, nothing is queued for idle work, and its logits equal a cold runner's bit
    for bit. With the default kernels (`fast`) the same reuse is off (the control)."""
    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores
    from llmhost.engine.backends.llamacpp.slots import choose
    from runners import greedy

    assert cpp.scheduler.runner.reuse.invariant and cpp.scheduler.runner.backends
    runners = [LlamaCppRunner(cpp.llm, 1024, 2, physical_cores(), exact=e) for e in (True, False, True)]
    warm, fast, cold = runners
    try:
        prompt = cpp.encode_chat([{"role": "user", "content": "Tell me about Lisbon."}])
        question = cpp.encode_chat([{"role": "user", "content": "Why?"}])[1:]
        diffs = []
        for runner in (warm, fast):
            reply, _ = greedy(runner, prompt, 300)
            assert len(prompt) + len(reply) > 300 and not runner.redo and not runner.idle_work(lambda: False)
            turn = [*prompt, *reply, *question]
            assert choose(runner.slots, turn, None, runner.reuse)[1] == len(prompt) + len(
                reply
            )  # not a whole number of blocks
            diffs.append(float((greedy(runner, turn, 1)[1] - greedy(cold, turn, 1)[1]).abs().max()))
        assert warm.reuse.invariant and diffs[0] == 0.0
        assert diffs[1] > 0.0, "the default kernels' decoded cells were a cold run's too"
    finally:
        for runner in runners:
            runner.close()


def test_the_cpu_backend_is_found_under_a_context_and_without_it_the_blocks_scheme_stays(
    cpp, monkeypatch
) -> None:
    """`ggml_cpu` finds the one CPU backend of each context (llama.cpp hands it to the abort
    callback's setter) and puts the registry's lookup back; where ggml's libraries cannot be
    reached, no backend is found and the runner measures itself onto the blocks scheme."""
    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores
    from llmhost.engine.backends.llamacpp import kernels as ggml_cpu
    from runners import greedy

    libs = ggml_cpu._load()
    assert libs is not None
    reg = libs.ggml.ggml_backend_reg_by_name(b"CPU")
    before = ctypes.c_void_p.from_address(reg + ggml_cpu._PROC_OFFSET).value
    runner = LlamaCppRunner(cpp.llm, 256, 1, physical_cores())
    try:
        (backend,) = runner.backends
        assert libs.cpu.ggml_backend_is_cpu(backend) and backend not in cpp.scheduler.runner.backends
        assert ctypes.c_void_p.from_address(reg + ggml_cpu._PROC_OFFSET).value == before
    finally:
        runner.close()
    monkeypatch.setattr(ggml_cpu, "_load", lambda: None)
    runner = LlamaCppRunner(cpp.llm, 1024, 1, physical_cores())
    try:
        assert runner.backends == []
        greedy(runner, cpp.encode_chat(QUESTION), 8)
        assert (
            runner.reuse.invariant is False and runner.reuse.granular and runner.redo
        )  # the reply, made again
    finally:
        runner.close()


def test_reference_kernels_make_a_long_reply_the_same_alone_and_beside_others(cpp) -> None:
    """A request decoding alone past 256 cells took the default kernels' split attention and
    beside others did not (logits off by up to 1.3); with the reference kernels its teacher-
    forced logits are bit-identical alone and beside another request's row."""
    from types import SimpleNamespace

    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores

    def request(text: str) -> SimpleNamespace:
        ids = cpp.encode_chat([{"role": "user", "content": text}])
        return SimpleNamespace(prompt_ids=ids, seq=SimpleNamespace(cached_tokens=0), adapter=None)

    runner = LlamaCppRunner(cpp.llm, 1024, 2, physical_cores())
    try:
        long_prompt = "Write a story about a dragon who learns to cook. " * 24  # ≈280 tokens
        runs = []
        for company in (False, True):
            runner.forget()
            rows = [request(long_prompt)]
            if company:
                rows.insert(0, request("Count to ten."))
            logits = []
            for req in rows:
                logits = [runner.prefill(req)]
                runner.commit_prefill()
                req.last_token = int(logits[0].argmax())
            assert len(rows[-1].prompt_ids) > 256
            for step in range(12):
                logits.append(runner.step(rows)[-1])
                for req in rows:
                    req.last_token = 100 + step  # the same forced tokens each time
            runner.drop([])
            runs.append(logits)
        assert max(float((a - b).abs().max()) for a, b in zip(*runs, strict=True)) == 0.0
    finally:
        runner.close()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_serve_reuses_each_reply_at_once(cpp, mode) -> None:
    """Through the server and the official client, with either prefix cache: each turn of a
    conversation sent the moment the reply ends reports all but its new message as cached; with
    `exact`, the default, every reply also equals a cold run's (the in-process engine, its cache
    emptied first)."""
    from servers import LocalServer

    server = LocalServer("--engine", "llamacpp", "--prefix-cache", mode, "--context-length", "2048")
    try:
        client = server.client()
        conversation: list[dict] = []
        for question in TURNS[:4]:
            conversation.append({"role": "user", "content": question})
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct", messages=conversation, max_tokens=60, temperature=0
            )
            usage, text = reply.usage, reply.choices[0].message.content
            if len(conversation) > 1:  # the template's turn markers and a short question
                new = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
                assert 0 < new < 40, (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens)
            if mode == "exact":
                cold = _cold(cpp, conversation, GenerationParams(temperature=0, max_new_tokens=60))
                assert text == cold.text
            conversation.append({"role": "assistant", "content": text})
    finally:
        assert server.stop() == 0, server.log


def test_running_slots_stay_one_run_so_a_step_is_one_micro_batch(cpp) -> None:
    """llama.cpp evaluates each run of consecutive KV streams as a micro-batch of its own (2x
    the time for 8 rows in reverse order). A step sends its rows in slot order; a new request
    takes the free slot that keeps the running slots one run (a cached prefix elsewhere is
    copied there), a gap left by a finished one is closed, and replies still equal cold runs."""
    from types import SimpleNamespace

    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores

    runner = LlamaCppRunner(cpp.llm, 512, 4, physical_cores())
    cold = LlamaCppRunner(cpp.llm, 512, 4, physical_cores())
    sent: list[list[int]] = []  # the sequence ids of each llama_decode call
    decode = runner._decode

    def recording(tokens: list, abortable: bool = False) -> bool:
        sent.append([t[2] for t in tokens])
        return decode(tokens, abortable)

    runner._decode = recording
    system = {"role": "system", "content": "You are a guide to Lisbon. " * 12}
    chats = [[system, {"role": "user", "content": q}] for q in ("Trams?", "Food?", "Fado?", "Hills?")]
    live: list[SimpleNamespace] = []

    def request(ids: list[int]) -> SimpleNamespace:
        return SimpleNamespace(prompt_ids=ids, seq=SimpleNamespace(cached_tokens=0), adapter=None)

    def start(messages: list[dict]) -> SimpleNamespace:
        req = request(cpp.encode_chat(messages))
        req.first = runner.prefill(req)
        req.last_token = int(req.first.argmax())
        runner.commit_prefill()
        live.append(req)
        return req

    def step() -> None:
        sent.clear()
        logits = runner.step(live)
        for req, row in zip(live, logits, strict=True):
            req.last_token = int(row.argmax())
        assert sent == [runner.running], sent  # one call, rows in slot order

    def finish(req: SimpleNamespace) -> None:
        i = live.index(req)
        del live[i]
        runner.drop([j for j in range(len(live) + 1) if j != i])

    try:
        a, _, c = (start(m) for m in chats[:3])  # slots 0, 1, 2
        assert runner.running == [0, 1, 2]
        step()
        finish(a)  # slot 0 keeps a's prompt (and its logits) for a retry
        start(chats[3])  # shares only the system prompt's block: takes slot 3, not a's
        assert runner.running == [1, 2, 3]
        step()
        finish(c)  # slots 1 and 3 would run as two micro-batches: a running row moves
        assert _runs(set(runner.running)) == 1
        step()
        # the row moved into the slot used the longest ago (a's); c's retry starts from c's
        # kept prompt, next to the running slots
        again = start(chats[2])
        ids = again.prompt_ids
        assert _runs(set(runner.running)) == 1 and len(runner.running) == 3
        assert again.seq.cached_tokens == len(ids)
        assert bool((again.first == c.first).all())
        step()
        assert bool((cold.prefill(request(ids)) == again.first).all())
    finally:
        runner.close()
        cold.close()


def test_a_gap_left_by_a_finished_request_is_closed_and_the_moved_row_decodes_on(cpp) -> None:
    """When a request in the middle of the running slots finishes, a running row moves into a
    free slot (a copy of its KV stream) so that the others are one run again; the moved row's
    reply goes on exactly as it would have."""
    from types import SimpleNamespace

    from llmhost.engine.backends.llamacpp import LlamaCppRunner, physical_cores
    from runners import greedy

    runner = LlamaCppRunner(cpp.llm, 512, 4, physical_cores())
    cold = LlamaCppRunner(cpp.llm, 512, 4, physical_cores())
    try:
        prompts = [cpp.encode_chat([{"role": "user", "content": q}]) for q in ("Rome?", "Oslo?", "Lima?")]
        reqs = []
        for ids in prompts:
            req = SimpleNamespace(prompt_ids=ids, seq=SimpleNamespace(cached_tokens=0), adapter=None)
            req.last_token = int(runner.prefill(req).argmax())
            runner.commit_prefill()
            reqs.append(req)
        out: list[list[int]] = [[r.last_token] for r in reqs]
        for n in range(20):
            if n == 5:  # the middle request ends: slots 0 and 2 would run as two micro-batches
                runner.drop([0, 2])
                del reqs[1], out[1]
                assert runner.running in ([0, 1], [1, 2], [2, 3]), runner.running
            logits = runner.step(reqs)
            for req, row, tokens in zip(reqs, logits, out, strict=True):
                req.last_token = int(row.argmax())
                tokens.append(req.last_token)
        for ids, tokens in zip([prompts[0], prompts[2]], out, strict=True):
            assert greedy(cold, ids, len(tokens))[0] == tokens
    finally:
        runner.close()
        cold.close()
