"""Per-request state while decoding: token ids in, typed chunks out.

Engines call `add()` with each sampled id and `finish()` when they stop early; the rules for
end-of-sequence, stop strings, max tokens, UTF-8 safety and timings live here once.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from llmhost.engine.chunks import Chunk, FinishReason, TokenLogprob, decode_rate
from llmhost.engine.params import GenerationParams
from llmhost.engine.reply import Parsed, ReplyParser
from llmhost.engine.sampling import LogitsProcessor
from llmhost.engine.text import Decoder, IncrementalDetokenizer, StopMatcher

#: A sampled token's log probability and its alternatives (id, logprob), from the sampler.
Scored = tuple[float, list[tuple[int, float]]]


class SequenceState:
    def __init__(
        self,
        tokenizer: Decoder,
        params: GenerationParams,
        prompt_tokens: int,
        eos_ids: Collection[int],
        started: float,
        dropped_turns: int = 0,
        reply: ReplyParser | None = None,
        processors: Sequence[LogitsProcessor] = (),
    ) -> None:
        self.params = params
        #: Reasoning, answer and tool calls from the raw text (a pass-through for plain chat).
        self.reply = reply or ReplyParser()
        #: Applied to this request's logits before sampling (a grammar's mask, say).
        self.processors = list(processors)
        self.prompt_tokens = prompt_tokens
        self.generated: list[int] = []
        self.finished = False
        self._eos = eos_ids
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(params.stop)
        self._started = started
        self._first: float | None = None
        self._last = started
        self._dropped = dropped_turns
        self._logprobs: tuple[TokenLogprob, ...] = ()
        #: Prompt tokens the runner found in its cache (set by a runner that reuses prefixes).
        self.cached_tokens = 0
        #: Tokens speculation proposed, and those of them sampled (kept), for the final chunk.
        self.drafted = self.accepted = 0

    def add(self, token_id: int, scored: Scored | None = None) -> Chunk:
        """Record one generated token; the returned chunk is final when the sequence ends."""
        self._last = time.perf_counter()
        if self._first is None:
            self._first = self._last
        self.generated.append(token_id)
        self._logprobs = (self._token_logprob(token_id, scored),) if scored is not None else ()
        if token_id in self._eos:
            return self.finish("stop", ids=(token_id,))
        text = self._stops.push(self._detok.push(token_id))
        if self._stops.stopped:
            return self._final(text, "stop", (token_id,))
        if len(self.generated) >= self.params.max_new_tokens:
            return self.finish("length", ids=(token_id,), text=text)
        parsed = self.reply.push(text)
        return Chunk(
            text=parsed.answer,
            reasoning=parsed.reasoning,
            tool_calls=tuple(parsed.calls),
            logprobs=self._logprobs,
            token_ids=(token_id,),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.generated),
        )

    def finish(self, reason: FinishReason, ids: tuple[int, ...] = (), text: str = "") -> Chunk:
        """End the sequence, emitting any text held back (unless a stop string cuts it)."""
        text += self._stops.push(self._detok.flush())
        if self._stops.stopped:
            reason = "stop"
        else:
            text += self._stops.flush()
        return self._final(text, reason, ids)

    def _final(self, text: str, reason: FinishReason, ids: tuple[int, ...]) -> Chunk:
        self.finished = True
        parsed = self.reply.push(text)
        rest = self.reply.flush()
        parsed = Parsed(
            parsed.answer + rest.answer, parsed.reasoning + rest.reasoning, parsed.calls + rest.calls
        )
        if reason == "stop" and self.reply.made_calls:
            reason = "tool_calls"
        n = len(self.generated)
        ttft = None if self._first is None else self._first - self._started
        return Chunk(
            text=parsed.answer,
            reasoning=parsed.reasoning,
            tool_calls=tuple(parsed.calls),
            logprobs=self._logprobs,
            token_ids=ids,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=n,
            finish_reason=reason,
            ttft_s=ttft,
            decode_tps=decode_rate(n, self._first, self._last),
            dropped_turns=self._dropped,
            cached_tokens=self.cached_tokens,
            stop_sequence=self._stops.matched,
            draft_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )

    def _token_logprob(self, token: int, scored: Scored) -> TokenLogprob:
        logprob, top = scored

        def entry(t: int, lp: float) -> tuple[str, float, tuple[int, ...]]:
            piece = self._detok.piece(t)
            return piece, lp, tuple(piece.encode("utf-8"))

        return TokenLogprob(*entry(token, logprob), tuple(entry(t, lp) for t, lp in top))
