"""A draft model for `--speculative draft`: a small GGUF model of the same vocabulary proposes the
next tokens greedily (a proposal made with certainty: the scheduler's sample-and-compare is then
the rejection-sampling rule, speculation.py), the target checks them in one pass.

It has a context of its own with a KV stream per target slot. What a target slot holds changes in
ways the draft does not see (proposals rejected, slots copied and compacted, prompts reused), so
each stream is kept in step by content: before drafting, a row's stream drops what differs from
the row's tokens and evaluates what it lacks (a new prompt: all of it, once)."""

from __future__ import annotations

import logging
from typing import Any

import llmhost.engine.backends.llamacpp.measure as measure
from llmhost.engine.backends.prefix import common_prefix
from llmhost.engine.speculation import BatchCost
from llmhost.errors import InvalidRequestError, LlmhostError

log = logging.getLogger("llmhost.llamacpp")

#: Positions one catch-up pass evaluates (a new prompt goes in pieces of this size).
CATCH_UP_BATCH = 256


def check_vocabulary(target: Any, draft: Any, target_name: str, draft_name: str) -> None:
    """Refuse a draft model whose tokens are not the target's, id for id: its proposals would be
    other words (a clear message, not a slow or garbled reply)."""
    import llama_cpp

    n_target, n_draft = target.n_vocab(), draft.n_vocab()
    hint = "pick a smaller model of the same family (Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct)"
    if n_target != n_draft:
        raise InvalidRequestError(
            f"--draft-model {draft_name} has {n_draft} tokens, {target_name} {n_target}: {hint}"
        )
    vocabs = [llama_cpp.llama_model_get_vocab(m.model) for m in (target, draft)]
    for token in range(n_target):
        texts = [llama_cpp.llama_vocab_get_text(v, token).decode("utf-8", "replace") for v in vocabs]
        if texts[0] != texts[1]:
            raise InvalidRequestError(
                f"--draft-model {draft_name}'s token {token} is {texts[1]!r}, {target_name}'s is "
                f"{texts[0]!r}: {hint}"
            )


class DraftModel:
    """The draft model's context: one KV stream per target slot (`slot_tokens` each)."""

    def __init__(self, llm: Any, slots: int, slot_tokens: int, threads: int) -> None:
        import llama_cpp

        self.llm = llm
        self.n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = slot_tokens * slots
        params.n_batch = params.n_ubatch = max(CATCH_UP_BATCH, slots)
        params.n_seq_max = slots
        params.kv_unified = False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise LlmhostError(
                f"llama.cpp could not make the draft model's cache ({slots} × {slot_tokens} tokens)"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        #: The tokens in each stream's cells, by target slot id.
        self.held: list[list[int]] = [[] for _ in range(slots)]
        #: One pass of the draft model over n positions, measured at the first draft (speculation's rule).
        self.cost: BatchCost | None = None
        self.max_positions = params.n_batch

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        import llama_cpp

        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if (code := llama_cpp.llama_decode(self.ctx, b)) != 0:
            raise LlmhostError(f"llama.cpp could not evaluate the draft model's batch (code {code})")

    def _greedy(self, index: int) -> int:
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def propose(self, rows: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (slot id, the row's tokens up to its last sampled one, k): k greedy tokens."""
        import llama_cpp

        if self.cost is None:  # the first draft, on the thread that decodes: every stream is empty
            self.cost = measure.batch_cost(self, "llama.cpp draft model")
            self.held[0] = []
        nexts = []
        for slot, tokens, _ in rows:  # catch up: the stream holds all but the last token's logits
            keep = min(common_prefix(self.held[slot], tokens), len(tokens) - 1)
            llama_cpp.llama_memory_seq_rm(self.memory, slot, keep, -1)
            for start in range(keep, len(tokens), CATCH_UP_BATCH):
                part = tokens[start : start + CATCH_UP_BATCH]
                last = start + len(part) == len(tokens)
                self._decode([(t, start + i, slot, last and i == len(part) - 1) for i, t in enumerate(part)])
            self.held[slot] = list(tokens)
            nexts.append(self._greedy(len(part) - 1))
        drafts: list[list[int]] = [[t] for t in nexts]
        for step in range(1, max(k for *_, k in rows)):
            going = [i for i, (*_, k) in enumerate(rows) if k > step]
            self._decode([(drafts[i][-1], len(rows[i][1]) + step - 1, rows[i][0], True) for i in going])
            for j, i in enumerate(going):
                self.held[rows[i][0]].append(drafts[i][-1])
                drafts[i].append(self._greedy(j))
        return [d[:k] for d, (*_, k) in zip(drafts, rows, strict=True)]

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
