"""Per-request state while decoding: token ids in, typed chunks out.

Engines call `add()` with each sampled id and `finish()` when they stop early; the rules for
end-of-sequence, stop strings, max tokens, UTF-8 safety and timings live here once.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from llmhost.engine.chunks import Chunk, FinishReason, decode_rate
from llmhost.engine.params import GenerationParams
from llmhost.engine.text import Decoder, IncrementalDetokenizer, StopMatcher


class SequenceState:
    def __init__(
        self,
        tokenizer: Decoder,
        params: GenerationParams,
        prompt_tokens: int,
        eos_ids: Collection[int],
        started: float,
        dropped_turns: int = 0,
    ) -> None:
        self.params = params
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

    def add(self, token_id: int) -> Chunk:
        """Record one generated token; the returned chunk is final when the sequence ends."""
        self._last = time.perf_counter()
        if self._first is None:
            self._first = self._last
        self.generated.append(token_id)
        if token_id in self._eos:
            return self.finish("stop", ids=(token_id,))
        text = self._stops.push(self._detok.push(token_id))
        if self._stops.stopped:
            return self._final(text, "stop", (token_id,))
        if len(self.generated) >= self.params.max_new_tokens:
            return self.finish("length", ids=(token_id,), text=text)
        return Chunk(
            text=text,
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
        n = len(self.generated)
        ttft = None if self._first is None else self._first - self._started
        return Chunk(
            text=text,
            token_ids=ids,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=n,
            finish_reason=reason,
            ttft_s=ttft,
            decode_tps=decode_rate(n, self._first, self._last),
            dropped_turns=self._dropped,
        )
