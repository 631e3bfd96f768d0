"""Prompt-lookup speculation without a model: the lookup index, the batch rule, and the scheduler
checking proposals against a runner whose next-token distribution is known (a Markov chain
over a few tokens), so that what speculation samples can be compared with what it must."""

from __future__ import annotations

import math

import pytest
import torch

from llmhost.engine.chunks import collect
from llmhost.engine.params import GenerationParams
from llmhost.engine.scheduler import Scheduler
from llmhost.engine.sequence import SequenceState
from llmhost.engine.speculation import (
    DRAFT_MAX,
    BatchCost,
    Drafter,
    Lookup,
    expected_tokens,
    plan,
)

# -- the lookup index -----------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_earlier_match_longest_first() -> None:
    look = Lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # the suffix 1 2 3 occurred at 0..2 (followed by 4 5); 2 3 alone, later, is followed by 7 8
    assert look.propose(2) == [4, 5]
    look.extend([6])
    assert look.propose(3) == []  # "3 6" never occurred before
    look.extend([1, 2])
    assert look.propose(8) == [3, 6, 1, 2]  # the latest 1 2 is followed by 3 6 1 2 (not 3 4 5 ...)


def test_lookup_never_matches_the_suffix_with_itself_and_is_built_incrementally() -> None:
    tokens = [5, 6, 5, 6, 5, 6, 7, 5, 6]
    whole = Lookup(tokens)
    grown = Lookup()
    for t in tokens:
        grown.extend([t])
    assert whole.propose(4) == grown.propose(4) == [7, 5, 6]
    assert Lookup([5, 6]).propose(4) == []  # only the suffix itself
    assert Lookup([5, 6, 5, 6]).propose(0) == []


# -- the batch rule -------------------------------------------------------------------------


def test_batch_cost_interpolates_and_extrapolates_linearly() -> None:
    cost = BatchCost([1, 2, 4, 8], [10.0, 11.0, 13.0, 21.0])
    assert cost(1) == 10.0 and cost(3) == 12.0 and cost(6) == 17.0
    assert cost(16) == 37.0  # beyond the last size, the last slope


def drafter(tokens: list[int], acceptance: float) -> Drafter:
    return Drafter(Lookup(tokens), hits=100 * acceptance, trials=100)


COPYING = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2]  # proposes 3 ... 12 (DRAFT_MAX of them)


def test_one_row_speculates_as_far_as_pays_by_the_measured_cost() -> None:
    flat = BatchCost([1, 64], [1.0, 1.0])  # a pass costs the same for any positions: all of it
    assert plan([drafter(COPYING, 0.9)], flat, 64) == [[3, 4, 5, 6, 7, 8, 9, 10][:DRAFT_MAX]]
    linear = BatchCost([1, 64], [1.0, 64.0])  # each position costs a step: never
    d = drafter(COPYING, 0.9)
    assert plan([d], linear, 64) == [[]]
    assert d.waiting > 0  # and it backs off
    # a cost that rises: k grows with the acceptance
    rising = BatchCost([1, 2, 4, 8], [1.0, 1.1, 1.4, 2.4])
    low, high = (len(plan([drafter(COPYING, a)], rising, 64)[0]) for a in (0.5, 0.95))
    assert 0 < low < high


def test_a_batch_speculates_only_while_its_extra_positions_cost_little() -> None:
    # eight rows: a plain step evaluates 8 positions; 8 more cost nearly as much again
    cost = BatchCost([1, 8, 16, 64], [1.0, 1.2, 2.2, 8.0])
    rows = [drafter(COPYING, 0.6) for _ in range(8)]
    assert plan(rows, cost, 64) == [[]] * 8
    one = [drafter(COPYING, 0.6)]
    assert plan(one, cost, 64) != [[]]  # alone it pays
    # positions beyond what one pass takes are never proposed
    assert sum(len(d) + 1 for d in plan([drafter(COPYING, 0.99)] * 4, BatchCost([1, 64], [1, 1]), 20)) <= 20


def test_acceptance_counts_trials_up_to_the_first_rejection_and_back_off_grows() -> None:
    d = drafter(COPYING, 0.5)
    for _ in range(30):
        d.settle(8, 8)  # whole proposals right
    d.settle(8, 0)  # then one wholly wrong: one rejection, not eight
    assert d.acceptance > 0.9
    linear = BatchCost([1, 64], [1.0, 64.0])
    waits = []
    for _ in range(3):
        assert plan([d], linear, 64) == [[]]
        waits.append(d.waiting)
        while d.waiting:
            assert plan([d], linear, 64) == [[]]
        assert d.probing
        assert plan([d], linear, 64) == [[3]]  # the probe: one token whatever the rule says
        d.settle(1, 0)
    assert waits[0] < waits[1] < waits[2]  # failing probes wait longer each time
    while d.waiting:
        plan([d], linear, 64)
    d.settle(1, 1)  # a probe wholly accepted: the reply turned to copying
    assert d.pause == waits[0] and d.acceptance > 0.8  # it starts over, its failures forgotten


def test_expected_tokens_is_the_geometric_sum() -> None:
    assert expected_tokens(0.5, 0) == 1
    assert math.isclose(expected_tokens(0.5, 3), 1.875)


# -- the scheduler checks proposals -------------------------------------------------------------

VOCAB = 5
EOS = 4
#: P[a] is the distribution of the token after a (no EOS: replies run to max tokens)
P = torch.tensor(
    [
        [0.05, 0.60, 0.25, 0.10, 0.0],
        [0.10, 0.05, 0.70, 0.15, 0.0],
        [0.30, 0.10, 0.05, 0.55, 0.0],
        [0.50, 0.20, 0.25, 0.05, 0.0],
        [0.25, 0.25, 0.25, 0.25, 0.0],
    ]
)


class Digits:
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(str(i) for i in ids)


class MarkovRunner:
    """A model whose next token depends on the last one only (`P`): a verify pass's logits at
    each position are exactly a plain step's there, as on llama.cpp's reference kernels."""

    device = "cpu"
    max_batch = 4
    max_positions = 64
    verifies_exactly = True
    batch_cost = BatchCost([1, 64], [1.0, 1.0])  # speculation always pays

    def __init__(self) -> None:
        self.rows: list[int] = []  # cells per row
        self.staged = 0
        self.verified = self.rolled_back = 0

    @staticmethod
    def logits(token: int) -> torch.Tensor:
        return torch.log(P[token])

    def prefill(self, req) -> torch.Tensor:
        self.staged = len(req.prompt_ids)
        return self.logits(req.prompt_ids[-1])

    def commit_prefill(self) -> None:
        self.rows.append(self.staged)

    def step(self, reqs) -> torch.Tensor:
        return torch.stack([rows[0] for rows in self.verify(reqs, [[] for _ in reqs])])

    def verify(self, reqs, drafts):
        out = []
        for row, (req, draft) in enumerate(zip(reqs, drafts, strict=True)):
            self.rows[row] += 1 + len(draft)
            self.verified += len(draft)
            out.append(torch.stack([self.logits(t) for t in [req.last_token, *draft]]))
        return out

    def rollback(self, row: int, n: int) -> None:
        assert 0 <= n < self.rows[row]
        self.rows[row] -= n
        self.rolled_back += n

    def drop(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]

    def has_room(self, req) -> bool:
        return True


def replies(speculative: str, seeds: range, tokens: int = 24) -> tuple[list[list[int]], MarkovRunner, int]:
    runner = MarkovRunner()
    scheduler = Scheduler(runner, max_queue=1000, speculative=speculative)  # type: ignore[arg-type]
    prompt = [0, 1, 2, 3] * 8  # a pattern the lookup keeps proposing from
    out, accepted = [], 0
    try:
        for seed in seeds:
            params = GenerationParams(max_new_tokens=tokens, temperature=1.0, top_p=1.0, seed=seed)
            seq = SequenceState(Digits(), params, len(prompt), {EOS}, 0.0)
            result = collect(scheduler.submit(prompt, seq))
            out.append(result.token_ids)
            accepted += result.accepted_tokens
            assert result.draft_tokens >= result.accepted_tokens
    finally:
        scheduler.close()
    return out, runner, accepted


def test_seeded_sampling_with_speculation_is_the_very_reply_without_it() -> None:
    """Sampling each proposed position as a plain step would, with the request's generator, draws
    the same numbers in the same order: a seed gives the same reply with speculation as without
    (where the runner computes a position alike in a verify pass, as here)."""
    plain, off_runner, none = replies("off", range(40))
    fast, runner, accepted = replies("ngram", range(40))
    assert none == 0 and off_runner.verified == 0
    assert fast == plain
    assert runner.verified > 0 and accepted > 0 and runner.rolled_back > 0


def test_speculation_leaves_the_sampled_distribution_unchanged() -> None:
    """Pearson's χ² of every transition sampled with speculation against the chain's own P: the
    rule is rejection sampling, so the counts must fit P (a rule that kept proposals more
    readily than P does would fit the proposals instead; threshold: χ² 0.999 quantile)."""
    sampled, _, accepted = replies("ngram", range(1000, 1400), tokens=30)
    assert accepted > 1000  # most positions went through a proposal
    counts = torch.zeros(VOCAB, VOCAB)
    for reply in sampled:
        for a, b in zip([3, *reply], reply, strict=False):  # the prompt ends in 3
            counts[a, b] += 1
    chi2, dof = 0.0, 0
    for a in range(EOS):
        n = counts[a].sum()
        expected = n * P[a, :EOS]
        chi2 += float(((counts[a, :EOS] - expected) ** 2 / expected).sum())
        dof += EOS - 1
    assert chi2 < 32.9, f"χ² {chi2:.1f} over {dof} degrees of freedom"  # χ²(12), 0.999 quantile


# -- llama.cpp: the embedded model ------------------------------------------------------------

CODE = '''def merge(left, right):
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    return out + left[i:] + right[j:]
'''
COPY = [{"role": "user", "content": "Rename `merge` to `merge_sorted` in this code:\n\n" + CODE}]


@pytest.fixture(scope="module")
def cpp():
    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.engine.backends.llamacpp import INSTALL, available

    if not available():
        pytest.skip(f"llama-cpp-python is not installed: {INSTALL}")
    engine = load(None, LoadSettings(engine="llamacpp", context_length=2048, speculative="off"))
    yield engine
    engine.close()


def ask(engine, speculative: str, messages=COPY, **values):
    from llmhost.engine.request import GenerationRequest

    params = GenerationParams(speculative=speculative, **{"temperature": 0, "max_new_tokens": 64, **values})
    return engine.generate(GenerationRequest(messages, params))


def test_the_embedded_model_checks_proposals_exactly_here(cpp) -> None:
    """The reference kernels compute a position alike in a verify pass and a decode step
    (measured at load): the condition for `auto`, and for the identities below."""
    assert cpp.scheduler.runner.verifies_exactly
    cost = cpp.scheduler.runner.batch_cost
    assert cost is not None and len(cost.sizes) == len(cost.seconds) >= 4


@pytest.mark.parametrize(
    "values",
    [
        {},  # greedy
        {"temperature": 0.9, "top_p": 0.95, "seed": 11},  # seeded sampling
        {"logprobs": 2, "stop": ["one sorted"]},
        {"json_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}},
    ],
    ids=["greedy", "seeded", "logprobs-stop", "json"],
)
def test_a_reply_with_speculation_is_the_reply_without_it(cpp, values) -> None:
    """Copying code: most tokens come from proposals, checked in one pass each, and the reply is
    the same tokens (logprobs equal too; the grammar masks each checked position, a stop string
    ends the reply where it would)."""
    plain = ask(cpp, "off", **values)
    fast = ask(cpp, "ngram", **values)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    assert fast.logprobs == plain.logprobs
    assert plain.draft_tokens == 0 and fast.accepted_tokens > 0 and fast.draft_tokens >= fast.accepted_tokens
    if "stop" in values:
        assert fast.finish_reason == "stop" and fast.stop_sequence == "one sorted"


def test_rows_speculating_side_by_side_equal_their_replies_alone(cpp) -> None:
    """Three requests at once, two copying (one of them sampled) and one asking a question: each
    row's proposal is checked in the same pass and rolled back on its own."""
    import concurrent.futures

    asks = [
        ("ngram", COPY, {}),
        ("ngram", COPY, {"temperature": 0.8, "seed": 3}),
        ("ngram", [{"role": "user", "content": "Name three rivers in China."}], {"max_new_tokens": 40}),
    ]
    alone = [ask(cpp, "off", m, **v).token_ids for _, m, v in asks]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda a: ask(cpp, a[0], a[1], **a[2]), asks))
    assert [r.token_ids for r in together] == alone
    assert cpp.scheduler.peak_batch >= 2 and together[0].accepted_tokens > 0


def test_auto_speculates_only_where_checks_are_exact(cpp) -> None:
    """`--prefix-cache fast` keeps ggml's default kernels, which compute a verify pass's positions
    differently from a decode step's in the last bits: `auto` does not speculate there, `ngram`
    does when asked."""
    from llmhost.config import LoadSettings
    from llmhost.engine import load

    fast = load(None, LoadSettings(engine="llamacpp", context_length=2048, prefix_cache="fast"))
    try:
        assert not fast.scheduler.runner.verifies_exactly and fast.facts()["speculative"] == "auto"
        assert ask(fast, "auto", max_new_tokens=30).draft_tokens == 0
        assert ask(fast, "ngram", max_new_tokens=30).draft_tokens > 0
    finally:
        fast.close()


def test_the_engines_behind_other_servers_refuse_forced_speculation_and_the_cli_says_the_choices(
    tiny_dir, tmp_path
) -> None:
    from cli import llmhost
    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"--speculative ngram is the llama\.cpp and .*vllm engine"):
        load(str(tiny_dir), LoadSettings(speculative="ngram", engine="vllm"))
    bad = llmhost("generate", "--speculative", "lookahead", "Hi", home=tmp_path)
    assert bad.returncode == 2 and "--speculative" in bad.stderr and "'ngram'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_server_takes_it_per_request_and_counts_it_in_metrics(engine_server) -> None:
    from engines import KEY, MODEL
    from servers import metric

    served = engine_server("llamacpp")
    with served.server.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        before = metric(http.get("/metrics").text, "llmhost_speculative_accepted_tokens_total")
        reply = served.client().chat.completions.create(
            model=MODEL, messages=COPY, max_tokens=60, temperature=0, extra_body={"speculative": "ngram"}
        )
        text = http.get("/metrics").text
        bad = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": COPY, "speculative": "draft"}
        )
    assert reply.choices[0].message.content
    assert metric(text, "llmhost_speculative_accepted_tokens_total") > before
    assert 0 < metric(text, "llmhost_speculative_acceptance_rate") <= 1
    assert bad.status_code == 400 and "speculative" in bad.json()["error"]["message"]


# -- transformers: the embedded model in float32 ----------------------------------------------


def greedy_at_every_position(engine, messages, reply: list[int]) -> bool:
    """Whether each token of `reply` is the most likely one (within float32 rounding) after the
    prompt and the reply's tokens before it, in one teacher-forced pass of the model: what a
    greedy reply must be whatever batches its tokens were computed in."""
    import torch

    prompt = engine.encode_chat(messages)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prompt + reply])).logits[0]
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(reply)]
    gap = rows.max(-1).values - rows[torch.arange(len(reply)), torch.tensor(reply)]
    return bool((gap <= 1e-3).all())


def test_transformers_checks_proposals_in_its_padded_batch(embedded_dir) -> None:
    """The transformers runner verifies each row's proposal in one padded pass and rolls rows back
    by different amounts (re-left-padding them): three concurrent replies, each greedy at every
    position. Its CPU matmuls round a pass of several positions differently from one, so `auto`
    stays off there (measured at load); `ngram` asks for it."""
    import concurrent.futures

    from llmhost.config import LoadSettings
    from llmhost.engine import load

    engine = load(str(embedded_dir), LoadSettings(engine="transformers", dtype="float32"))
    try:
        question = [{"role": "user", "content": "Say the word 'apple' five times."}]
        asks = [(COPY, 60), (question, 20), (COPY, 40)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda a: ask(engine, "ngram", a[0], max_new_tokens=a[1]), asks))
        runner = engine.scheduler.runner
        assert runner.batch_cost is not None and engine.scheduler.peak_batch >= 2
        assert sum(r.accepted_tokens for r in replies) > 0
        for (messages, _), reply in zip(asks, replies, strict=True):
            assert greedy_at_every_position(engine, messages, reply.token_ids)
        if not runner.verifies_exactly:
            assert ask(engine, "auto", COPY, max_new_tokens=30).draft_tokens == 0
    finally:
        engine.close()


# -- llama.cpp: a draft model ------------------------------------------------------------------


def test_a_draft_model_proposes_and_the_reply_is_the_reply_without_it(cpp, tmp_path) -> None:
    """`--draft-model` (here the embedded model drafting for itself: the same vocabulary, and a
    draft that is right nearly always): `auto` becomes `draft`, proposals come from the draft
    model's own KV streams kept in step with the slots, and greedy replies are the same tokens.
    A request asking for a draft model where none was loaded is a 400."""
    from llmhost.config import LoadSettings
    from llmhost.engine import load
    from llmhost.errors import InvalidRequestError
    from llmhost.store.embedded import embedded_gguf

    with pytest.raises(InvalidRequestError, match="loaded without one"):
        ask(cpp, "draft")
    gguf, _ = embedded_gguf()
    engine = load(None, LoadSettings(engine="llamacpp", context_length=2048, draft_model=str(gguf)))
    try:
        assert engine.facts()["speculative"] == "draft" and engine.facts()["draft_model"]
        plain = ask(cpp, "off")
        drafted = ask(engine, None)
        assert drafted.token_ids == plain.token_ids
        assert drafted.accepted_tokens > 0.8 * drafted.draft_tokens > 0
        again = ask(engine, None, [*COPY, {"role": "assistant", "content": plain.text}, *COPY])  # a next turn
        assert (
            again.token_ids
            == ask(cpp, "off", [*COPY, {"role": "assistant", "content": plain.text}, *COPY]).token_ids
        )
    finally:
        engine.close()


def test_a_draft_model_of_another_vocabulary_is_refused_with_what_to_pick(tmp_path) -> None:
    """A copy of the embedded GGUF whose token " hello" reads " hellq" (the same length: the file
    stays valid): its proposals would be other words, so the load stops with one line."""
    from cli import llmhost
    from llmhost.store.embedded import embedded_gguf

    gguf, _ = embedded_gguf()
    data = bytearray(gguf.read_bytes())
    at = data.find(b"\x07\x00\x00\x00\x00\x00\x00\x00\xc4\xa0hello")  # the token's GGUF string
    assert at > 0
    data[at + 14] = ord("q")
    other = tmp_path / "other-vocab.gguf"
    other.write_bytes(bytes(data))
    r = llmhost("generate", "--engine", "llamacpp", "--draft-model", str(other), "Hi", home=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "token" in r.stderr and "hellq" in r.stderr and "same family" in r.stderr
    r = llmhost("generate", "--speculative", "draft", "Hi", home=tmp_path)
    assert r.returncode == 2 and "needs --draft-model" in r.stderr
    # a damaged draft (a download cut short) is named as the file to mend, not the target
    cut = tmp_path / "cut-short.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    r = llmhost("generate", "--engine", "llamacpp", "--draft-model", str(cut), "Hi", home=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{cut} could not be read as a GGUF draft model (--draft-model)" in r.stderr.replace("\n", " ")
    assert str(gguf) not in r.stderr
