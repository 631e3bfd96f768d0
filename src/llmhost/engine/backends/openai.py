"""`--engine openai`: any OpenAI-compatible endpoint (vLLM, Ollama, another llmhost) as an engine,
so llmhost's own API keys, model names, metrics and error shape stand in front of it.

Requests go through the official `openai` client, streaming; upstream chunks become llmhost
chunks (text deltas, token counts, timings), so every front end works unchanged.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.base import Engine
from llmhost.engine.chunks import Chunk, Embedded, FinishReason, Scored
from llmhost.engine.context import request_messages
from llmhost.engine.openai_stream import StreamReader
from llmhost.engine.params import GenerationParams
from llmhost.engine.request import EmbedRequest, GenerationRequest, RerankRequest
from llmhost.errors import InvalidRequestError, LlmhostError, ModelNotFoundError


class UpstreamError(LlmhostError):
    """The upstream failed or cannot be reached: a gateway problem, not the caller's."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


def load(name: str | None, settings: LoadSettings) -> OpenAIEngine:
    """The model `name` at --upstream (its first model when None). Here the reference is a name
    on the upstream, not a local model: it is never resolved against the store."""
    return OpenAIEngine.connect(settings.upstream, settings.upstream_key, name)


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str, context_length: int = 0) -> None:
        import openai

        self.base_url = base_url
        self.api_key = api_key
        self.name = model
        self.context_length = context_length
        self.placement = "upstream"
        key = api_key or "none"  # the client insists on a key; open upstreams ignore it
        self._sync = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
        self._async = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
        self._running = 0

    @classmethod
    def connect(cls, base_url: str | None, api_key: str | None, model: str | None) -> OpenAIEngine:
        """Check the upstream answers and serves `model` (its first model when None)."""
        if not base_url:
            raise InvalidRequestError("--engine openai needs --upstream URL (e.g. http://127.0.0.1:8000/v1)")
        models = available(base_url, api_key)
        if not models:
            raise UpstreamError(f"the upstream {base_url} lists no models")
        name = model or models[0]
        if name not in models:
            raise ModelNotFoundError(
                f"the upstream {base_url} has no model {name!r}; it has: {', '.join(models)}"
            )
        return cls(base_url, api_key, name)

    # -- requests --------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> dict:
        """The upstream's chat or completions body for `request`."""
        params = request.params
        messages = request_messages(request.messages, params)
        body: dict[str, Any] = {
            "model": self.name,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.fit_max_tokens and self.context_length and params.max_new_tokens >= self.context_length:
            # a ceiling past the window: let the upstream stop at the window's end (vLLM does)
            del body["max_tokens"]
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        extra = {}  # vLLM and llmhost accept these; only sent when asked for
        if params.top_k:
            extra["top_k"] = params.top_k
        fields = _reply_fields(params, chat=messages is not None)
        if messages is None and "response_format" in fields:  # not a field of the SDK's completions
            extra["response_format"] = fields.pop("response_format")
        body.update(fields)
        variables = dict(params.template_kwargs)
        if params.reasoning is not None:
            variables.setdefault("enable_thinking", params.reasoning)
        if variables and messages is not None:
            extra["chat_template_kwargs"] = variables
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
        if extra:
            body["extra_body"] = extra
        if messages is not None:
            body["messages"] = list(messages)
        else:
            body["prompt"] = request.prompt
        return body

    def _begin(self, client: Any, request: GenerationRequest) -> tuple[Any, dict, float]:
        """What both stream() and astream() send: the client's create method and the body."""
        self.check()
        if self.task != "chat":  # a vLLM pooling child: answer as a local embedding model would
            raise self.not_chat()
        body = self._body(request)
        api = client.chat.completions if "messages" in body else client.completions
        return api.create, body, time.perf_counter()

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        create, body, start = self._begin(self._sync, request)
        with upstream_errors(self.base_url, self.unreachable):
            raw = create(**body)  # errors raise here, before any chunk
        return self._sync_chunks(raw, start, request.cancel)

    def _sync_chunks(self, raw: Any, start: float, cancel: threading.Event | None) -> Iterator[Chunk]:
        state = _ChunkState(start)
        self._running += 1
        try:
            with upstream_errors(self.base_url, self.unreachable):
                for item in raw:
                    if cancel is not None and cancel.is_set():
                        yield state.finish("cancelled")
                        return
                    if (chunk := state.add(item)) is not None:
                        yield chunk
            yield state.finish()
        finally:
            self._running -= 1
            raw.close()  # hanging up makes an llmhost or vLLM upstream stop generating

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        create, body, start = self._begin(self._async, request)
        with upstream_errors(self.base_url, self.unreachable):
            raw = await create(**body)
        return self._async_chunks(raw, start, request.cancel)

    async def _async_chunks(
        self, raw: Any, start: float, cancel: threading.Event | None
    ) -> AsyncIterator[Chunk]:
        state = _ChunkState(start)
        self._running += 1
        try:
            with upstream_errors(self.base_url, self.unreachable):
                async for item in raw:
                    if cancel is not None and cancel.is_set():
                        yield state.finish("cancelled")
                        return
                    if (chunk := state.add(item)) is not None:
                        yield chunk
            yield state.finish()
        finally:
            self._running -= 1
            await raw.close()

    # embeddings and rerank pass through: the upstream's model says what it can do
    def embed(self, request: EmbedRequest) -> Embedded:
        return self._embedded(self._post(self._sync, "/embeddings", self._embed_body(request)))

    async def aembed(self, request: EmbedRequest) -> Embedded:
        return self._embedded(await self._post(self._async, "/embeddings", self._embed_body(request)))

    def rerank(self, request: RerankRequest) -> Scored:
        return self._scored(self._post(self._sync, "/rerank", self._rerank_body(request)), request)

    async def arerank(self, request: RerankRequest) -> Scored:
        return self._scored(await self._post(self._async, "/rerank", self._rerank_body(request)), request)

    def _post(self, client: Any, path: str, body: dict[str, Any]) -> Any:
        """The upstream's JSON answer (a coroutine for the async client); errors as upstream_errors'."""
        self.check()
        with upstream_errors(self.base_url, self.unreachable):
            answer = client.post(path, cast_to=object, body=body)
        if not asyncio.iscoroutine(answer):
            return answer

        async def awaited() -> Any:
            with upstream_errors(self.base_url, self.unreachable):
                return await answer

        return awaited()

    def _embed_body(self, request: EmbedRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "input": request.inputs, "encoding_format": "float"}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if request.prompt is not None:
            body["input_type" if request.prompt_optional else "prompt_name"] = request.prompt
        return body

    def _rerank_body(self, request: RerankRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "query": request.query, "documents": request.documents}
        if request.instruction is not None:
            body["instruction"] = request.instruction
        return body

    def _embedded(self, got: Any) -> Embedded:
        try:
            data = sorted(got["data"], key=lambda d: d["index"])
            return Embedded([d["embedding"] for d in data], int(got.get("usage", {}).get("prompt_tokens", 0)))
        except (KeyError, TypeError, AttributeError) as err:
            raise self._odd("embeddings", err) from None

    def _scored(self, got: Any, request: RerankRequest) -> Scored:
        try:
            scores = [0.0] * len(request.documents)
            for result in got["results"]:
                scores[result["index"]] = float(result["relevance_score"])
            return Scored(scores, int(got.get("usage", {}).get("total_tokens", 0)))
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            raise self._odd("rerank", err) from None

    def _odd(self, what: str, err: Exception) -> UpstreamError:
        return UpstreamError(
            f"the upstream {self.base_url} answered {what} in a shape llmhost does not know ({err!r})"
        )

    def check(self) -> None:
        """Raise when the upstream is known to be gone (a managed child that died)."""

    def unreachable(self) -> None:
        """Called when a connection is refused; may raise an error that says why."""

    @property
    def running(self) -> int:
        return self._running

    def close(self) -> None:
        self._sync.close()


class _ChunkState:
    """Upstream chunks → llmhost chunks; the last one carries usage and timings."""

    def __init__(self, start: float) -> None:
        self.reader = StreamReader(start)

    def add(self, item: Any) -> Chunk | None:
        r = self.reader
        text = r.read(item)
        calls = tuple(r.completed_calls())
        if not (text or r.reasoning or calls or r.logprobs):
            return None
        return Chunk(
            text=text,
            reasoning=r.reasoning,
            tool_calls=calls,
            logprobs=tuple(r.logprobs),
            completion_tokens=r.pieces,
        )

    def finish(self, reason: FinishReason | None = None) -> Chunk:
        r = self.reader
        upstream: FinishReason | None = None
        if r.finish_reason is not None:
            upstream = r.finish_reason if r.finish_reason in ("length", "tool_calls") else "stop"
        return Chunk(
            text="",
            tool_calls=tuple(r.completed_calls()),
            prompt_tokens=r.prompt_tokens or 0,
            completion_tokens=r.tokens,
            finish_reason=reason or upstream or "stop",
            ttft_s=r.ttft_s,
            decode_tps=r.decode_tps(),
            stop_sequence=r.stop_sequence if upstream == "stop" else None,
        )


def _reply_fields(params: GenerationParams, chat: bool) -> dict[str, Any]:
    """Tools, forced calls, JSON output and logprobs, in OpenAI's own fields."""
    body: dict[str, Any] = {}
    if params.json_schema is not None:  # vLLM and llmhost take it on completions too
        schema = {"name": "response", "schema": params.json_schema, "strict": True}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if not chat:  # the completions API: logprobs is a count; tools are chat's
        return {**body, "logprobs": params.logprobs} if params.logprobs is not None else body
    if params.tools:
        body["tools"] = params.tools
        body["tool_choice"] = (
            {"type": "function", "function": {"name": params.tool_name}}
            if params.tool_name
            else params.tool_choice
        )
        if params.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = params.parallel_tool_calls
    if params.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = params.logprobs
    return body


def available(base_url: str, api_key: str | None) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=30)
    with upstream_errors(base_url):
        return [m.id for m in client.models.list()]


class upstream_errors:
    """openai client exceptions → llmhost errors with the status a gateway should answer."""

    def __init__(self, base_url: str, unreachable: Callable[[], None] | None = None) -> None:
        self.base_url = base_url
        self.unreachable = unreachable

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        import openai

        if err is None or not isinstance(err, openai.OpenAIError):
            return
        if isinstance(err, openai.APIConnectionError):
            if self.unreachable is not None:
                self.unreachable()
            raise UpstreamError(f"the upstream {self.base_url} cannot be reached: {err}", 503) from err
        status = getattr(err, "status_code", None)
        body = getattr(err, "body", None)
        message = (body.get("message") if isinstance(body, dict) else None) or str(err)
        if status in (400, 422):
            param = body.get("param") if isinstance(body, dict) else None
            raise InvalidRequestError(f"the upstream refused the request: {message}", param) from err
        if status == 404:
            raise ModelNotFoundError(f"the upstream has no such model: {message}") from err
        if status in (401, 403):
            raise UpstreamError(
                f"the upstream {self.base_url} refused llmhost's key (--upstream-key)", 502
            ) from err
        if status in (429, 503):
            raise UpstreamError(f"the upstream is busy: {message}", 503) from err
        raise UpstreamError(f"the upstream failed: {message}", 502) from err
