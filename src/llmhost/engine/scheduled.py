"""What every engine that samples token by token shares: prompt preparation (context policy),
per-request state, and one scheduler thread that owns the model. An engine supplies how to
tokenize and a `BatchRunner` (prefill, step, drop) that returns logits."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Collection, Iterator

from llmhost.engine.base import Engine
from llmhost.engine.context import Message, fit_messages, validate_messages
from llmhost.engine.params import GenerationParams
from llmhost.engine.scheduler import BatchRunner, Scheduler
from llmhost.engine.sequence import SequenceState
from llmhost.engine.text import Decoder
from llmhost.engine.types import Chunk
from llmhost.errors import ContextOverflowError, InvalidRequestError


class ScheduledEngine(Engine):
    #: Turns token ids back into text (an HF tokenizer, or an adapter with the same `decode`).
    decoder: Decoder
    eos_ids: Collection[int]
    max_queue: int = 64

    @abstractmethod
    def encode_chat(self, messages: list[Message]) -> list[int]:
        """The chat template applied to `messages`, tokenized, ready for a reply."""

    @abstractmethod
    def encode_text(self, prompt: str) -> list[int]:
        """A plain prompt, tokenized as the model expects it (BOS where it wants one)."""

    @abstractmethod
    def runner(self) -> BatchRunner:
        """The model half of decoding; called once, by the scheduler's first use."""

    def prepare(
        self, messages: list[Message] | None, prompt: str | None, params: GenerationParams
    ) -> tuple[list[int], int]:
        """Prompt token ids and how many history messages were dropped to fit the window."""
        if (messages is None) == (prompt is None):
            raise InvalidRequestError("give either messages or a prompt")
        if prompt is not None:
            ids = self.encode_text(prompt)
            if len(ids) + params.max_new_tokens > self.context_length:
                raise ContextOverflowError(len(ids), params.max_new_tokens, self.context_length)
            return ids, 0
        assert messages is not None
        validate_messages(messages)
        if params.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": params.system}, *messages]
        _, dropped, ids = fit_messages(
            messages,
            self.encode_chat,
            params.max_new_tokens,
            self.context_length,
            truncate=params.truncate_history,
        )
        return ids, dropped

    @functools.cached_property
    def scheduler(self) -> Scheduler:
        return Scheduler(self.runner(), self.max_queue)

    def _sequence(
        self, messages: list[Message] | None, prompt: str | None, params: GenerationParams | None
    ) -> tuple[list[int], SequenceState]:
        started = time.perf_counter()
        params = params or GenerationParams()
        prompt_ids, dropped = self.prepare(messages, prompt, params)
        seq = SequenceState(self.decoder, params, len(prompt_ids), self.eos_ids, started, dropped)
        return prompt_ids, seq

    def stream(
        self,
        messages: list[Message] | None = None,
        params: GenerationParams | None = None,
        *,
        prompt: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        return self.scheduler.submit(*self._sequence(messages, prompt, params), cancel)

    async def astream(
        self,
        messages: list[Message] | None = None,
        params: GenerationParams | None = None,
        *,
        prompt: str | None = None,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Chunk]:
        # template rendering and tokenizing can take milliseconds: keep them off the event loop
        prompt_ids, seq = await asyncio.to_thread(self._sequence, messages, prompt, params)
        return self.scheduler.submit_async(prompt_ids, seq, asyncio.get_running_loop(), cancel)

    @property
    def queued(self) -> int:
        return self.scheduler.queued if "scheduler" in self.__dict__ else 0

    @property
    def running(self) -> int:
        return self.scheduler.running if "scheduler" in self.__dict__ else 0

    def close(self) -> None:
        if "scheduler" in self.__dict__:
            self.scheduler.close()
