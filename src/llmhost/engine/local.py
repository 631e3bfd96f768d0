"""The local engines (transformers, llama.cpp): what every engine that samples token by token
shares: prompt preparation (request rules, chat template, context policy), per-request state,
and one scheduler thread that owns the model. A backend supplies how to tokenize and a
`BatchRunner` (prefill, step, drop) that returns logits."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

from llmhost.engine.base import Engine
from llmhost.engine.chunks import Chunk
from llmhost.engine.context import Message, fit_messages, request_messages
from llmhost.engine.grammar import Grammars
from llmhost.engine.params import GenerationParams
from llmhost.engine.reply import THINK_OPEN, ReplyParser
from llmhost.engine.request import GenerationRequest
from llmhost.engine.running import BatchRunner
from llmhost.engine.scheduler import Scheduler
from llmhost.engine.sequence import SequenceState
from llmhost.engine.template import ChatTemplate
from llmhost.engine.text import Decoder
from llmhost.engine.tools import template_messages
from llmhost.errors import ContextOverflowError, InvalidRequestError

log = logging.getLogger("llmhost")


class LocalEngine(Engine):
    #: Turns token ids back into text (an HF tokenizer, or an adapter with the same `decode`).
    decoder: Decoder
    #: The chat template, rendered the same way for every backend.
    template: ChatTemplate
    eos_ids: Collection[int]
    max_queue: int = 64

    def encode_chat(self, messages: list[Message], params: GenerationParams | None = None) -> list[int]:
        """The chat template applied to `messages` (with the request's tools and template
        variables), tokenized: the template's markup makes the control tokens (BOS
        too, so none is added); text inside messages is only ever text."""
        params = params or GenerationParams()
        messages = self._for_template(messages, params)
        return self.template.encode(
            messages, self.encode_markup, self.encode_plain, self._tools(params), self._variables(params)
        )

    def _tools(self, params: GenerationParams) -> list[dict[str, Any]] | None:
        """Tools for a template that renders them (else `_for_template` describes them)."""
        return params.tools if params.offers_tools and self.template.native_tools else None

    def _for_template(self, messages: list[Message], params: GenerationParams) -> list[Message]:
        return template_messages(
            messages, params.tools if params.offers_tools else None, self.template.native_tools
        )

    def _variables(self, params: GenerationParams) -> dict[str, Any]:
        variables: dict[str, Any] = {}
        if params.reasoning is not None:
            variables["enable_thinking"] = params.reasoning
        return {**variables, **params.template_kwargs}

    @functools.cached_property
    def grammars(self) -> Grammars:
        """The vocabulary as the grammar library sees it (built on the first constrained request)."""
        return Grammars(self.grammar_tokenizer())

    def grammar_tokenizer(self) -> Any:
        """An llguidance tokenizer for this model's vocabulary."""
        raise NotImplementedError

    @abstractmethod
    def encode_markup(self, text: str) -> list[int]:
        """Template text, tokenized with its control tokens (`<|im_start|>`) as such."""

    @abstractmethod
    def encode_plain(self, text: str) -> list[int]:
        """Text tokenized as characters only: control-token text stays text."""

    @abstractmethod
    def encode_text(self, prompt: str) -> list[int]:
        """A plain prompt, tokenized as the model expects it (BOS where it wants one)."""

    @abstractmethod
    def runner(self) -> BatchRunner:
        """The model half of decoding; called once, by the scheduler's first use."""

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Prompt token ids and how many history messages were dropped to fit the window."""
        params = request.params
        messages = request_messages(request.messages, params)
        # a ceiling needs room for one token; the reply's limit is lowered to the rest (_sequence)
        reply = 1 if params.fit_max_tokens else params.max_new_tokens
        if messages is None:
            assert request.prompt is not None
            ids = self.encode_text(request.prompt)
            if len(ids) + reply > self.context_length:
                raise ContextOverflowError(len(ids), reply, self.context_length)
            return ids, 0
        _, dropped, ids = fit_messages(
            messages,
            functools.partial(self.encode_chat, params=params),
            reply,
            self.context_length,
            truncate=params.truncate_history,
        )
        return ids, dropped

    def count_tokens(self, request: GenerationRequest) -> int:
        """The whole prompt's tokens, without fitting it to the window (a count, not a request)."""
        messages = request_messages(request.messages, request.params)
        if messages is None:
            assert request.prompt is not None
            return len(self.encode_text(request.prompt))
        return len(self.encode_chat(messages, request.params))

    def warm_up(self) -> None:
        """One tiny reply while loading, so that the first user's request does not pay for what
        a first run costs (llama.cpp paging the weights in, kernels and threads starting, the
        template compiling): measured ≈ 1 s on the embedded model on 2 cores."""
        from llmhost.engine.chunks import collect
        from llmhost.errors import LlmhostError

        params = GenerationParams(max_new_tokens=2, temperature=0)
        try:
            if self.template.source is not None:
                collect(self.stream(GenerationRequest([{"role": "user", "content": "Hi"}], params)))
            collect(self.stream(GenerationRequest(prompt="Hi", params=params)))
        except LlmhostError as err:  # a model that cannot answer says so on a real request
            log.debug("warm-up failed: %s", err)

    @functools.cached_property
    def scheduler(self) -> Scheduler:
        return Scheduler(self.runner(), self.max_queue, self.speculative)

    #: Whether a draft model was loaded beside the model (`--draft-model`: llama.cpp's).
    has_draft_model = False

    def _sequence(self, request: GenerationRequest) -> tuple[list[int], SequenceState]:
        started = time.perf_counter()
        params = request.params
        if params.speculative == "draft" and not self.has_draft_model:
            raise InvalidRequestError(
                f'"speculative": "draft" asks for a draft model, and {self.name} was loaded without one '
                "(--draft-model): use auto or ngram",
                param="speculative",
            )
        prompt_ids, dropped = self.prepare(request)
        if params.fit_max_tokens:
            room = self.context_length - len(prompt_ids)
            params = params.model_copy(update={"max_new_tokens": min(params.max_new_tokens, room)})
        chat = request.chat
        reply = ReplyParser(
            thinks=chat and self.template.thinks,
            opened=chat and self._opens_thinking(prompt_ids),
            tools=chat and params.offers_tools,
            one_call=params.parallel_tool_calls is False,
        )
        grammar = self.grammars.processor(params, lambda: reply.answering) if _constrained(params) else None
        seq = SequenceState(
            self.decoder,
            params,
            len(prompt_ids),
            self.eos_ids,
            started,
            dropped,
            reply=reply,
            processors=[grammar] if grammar else [],
        )
        return prompt_ids, seq

    def _opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends inside a `<think>` block (the template opened it)."""
        if not self.template.thinks:
            return False
        tail = self.decoder.decode(prompt_ids[-8:], skip_special_tokens=False)
        return tail.rstrip().endswith(THINK_OPEN)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        return self.submit(request)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return await self.asubmit(request)

    def submit(self, request: GenerationRequest, adapter: str | None = None) -> Iterator[Chunk]:
        """`stream()`, decoding with the runner's adapter `adapter` (None: the base model)."""
        return self.scheduler.submit(*self._sequence(request), request.cancel, adapter)

    async def asubmit(self, request: GenerationRequest, adapter: str | None = None) -> AsyncIterator[Chunk]:
        # template rendering and tokenizing can take milliseconds: keep them off the event loop
        prompt_ids, seq = await asyncio.to_thread(self._sequence, request)
        loop = asyncio.get_running_loop()
        return self.scheduler.submit_async(prompt_ids, seq, loop, request.cancel, adapter)

    # -- LoRA adapters served on this model -----------------------------------------------

    def add_adapter(self, name: str, path: Path) -> AdapterView:
        """Requests for the adapter decode in the same batches as the base's and other
        adapters' requests; the runner applies each row's own adapter."""
        if not self.serves_adapters:
            return super().add_adapter(name, path)  # type: ignore[return-value]
        adapter_id = f"lora{next(self._adapter_ids)}"  # the runner's key: any store name is safe
        self.scheduler.call(lambda: self.scheduler.runner.add_adapter(adapter_id, path))
        return AdapterView(self, name, adapter_id)

    def remove_adapter(self, view: AdapterView) -> None:
        if "scheduler" in self.__dict__:
            self.scheduler.call(lambda: self.scheduler.runner.remove_adapter(view.adapter_id))

    @functools.cached_property
    def _adapter_ids(self) -> Iterator[int]:
        return itertools.count(1)

    @property
    def queued(self) -> int:
        return self.scheduler.queued if "scheduler" in self.__dict__ else 0

    @property
    def running(self) -> int:
        return self.scheduler.running if "scheduler" in self.__dict__ else 0

    def close(self) -> None:
        if "scheduler" in self.__dict__:
            self.scheduler.close()


def _constrained(params: GenerationParams) -> bool:
    return params.json_schema is not None or params.forces_tool


class AdapterView(Engine):
    """A LoRA adapter served on its loaded base model under its own name: the base's scheduler,
    with every request marked for the adapter (the runner applies it to that row only)."""

    def __init__(self, base: LocalEngine, name: str, adapter_id: str) -> None:
        self.base, self.name, self.adapter_id = base, name, adapter_id
        self.kind = base.kind
        self.context_length = base.context_length

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        return self.base.submit(request, self.adapter_id)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return await self.base.asubmit(request, self.adapter_id)

    @property
    def problem(self) -> str | None:
        return self.base.problem

    def close(self) -> None:
        self.base.remove_adapter(self)
