"""`create_app(pool, settings) -> FastAPI`: routes are one-liners over `Api`'s methods.

The event loop never waits on the model: engines hand chunks over with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from llmhost import __version__
from llmhost.engine.base import Engine
from llmhost.engine.chunks import Chunk, collect
from llmhost.engine.params import format_validation_error
from llmhost.errors import LlmhostError
from llmhost.server.metrics import Metrics
from llmhost.server.pool import ModelPool
from llmhost.server.protocols import Defaults, Protocol, Reply, make_protocols, openai_error, protocol_at
from llmhost.server.protocols.anthropic_messages import CountTokensRequest, Messages
from llmhost.server.protocols.openai_embeddings import EmbeddingsRequest
from llmhost.server.protocols.openai_embeddings import render as render_embeddings
from llmhost.server.protocols.openai_responses import Responses
from llmhost.server.protocols.rerank import RerankBody, RerankV2Body, ScoreBody, render_scores
from llmhost.server.settings import ServerSettings

log = logging.getLogger("llmhost.server")
T = TypeVar("T")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    @classmethod
    def from_llmhost(cls, err: LlmhostError) -> ApiError:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        code = getattr(err, "code", None) or {404: "model_not_found", 503: "server_busy"}.get(err.status)
        if getattr(err, "context_length", None):
            code = "context_length_exceeded"
        return cls(err.status, str(err), err.kind, getattr(err, "param", None), code, headers)

    def body(self, path: str = "") -> dict[str, Any]:
        """The error in the shape of the protocol served at `path` (OpenAI's elsewhere)."""
        protocol = protocol_at(path)
        if protocol is None:
            return openai_error(self.message, self.kind, self.param, self.code)
        return protocol.error_body(self.status, self.message, self.kind, self.param, self.code)

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


class Api:
    """The API's behaviour, independent of routing: each route calls one method."""

    def __init__(self, pool: ModelPool, settings: ServerSettings) -> None:
        self.pool = pool
        self.keys = [k.encode() for k in settings.api_keys()]
        self.metrics = Metrics(pool.queued, pool.running)
        self.draining = False
        self.in_flight = 0
        self.max_body = int(settings.max_body_mib * 2**20)
        #: What a request falls back on where it does not say (--reasoning).
        self.defaults = Defaults(reasoning={"on": True, "off": False}.get(settings.reasoning or ""))
        self.protocols = make_protocols(settings.responses_kept)

    def check_key(self, header: str, api_key: str = "") -> None:
        """`Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`."""
        if not self.keys:
            return
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else api_key.strip().encode()
        # compare against every key so the time taken does not reveal which one nearly matched
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "invalid_request_error",
                code="invalid_api_key",
            )

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_request_error") from None
        except RecursionError:
            raise ApiError(
                400, "the request body is nested too deeply to be a request", "invalid_request_error"
            ) from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_request_error")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            message, param = format_validation_error(err)
            raise ApiError(400, f"invalid request: {message}", "invalid_request_error", param) from None

    def health(self) -> JSONResponse:
        """503 with the reasons while a model cannot serve (its vLLM child died, say)."""
        problems = self.pool.problems()
        if problems:
            return JSONResponse({"status": "error", "problems": problems}, status_code=503)
        status = "draining" if self.draining else "ok"
        loaded = [u.engine.name for u in self.pool.loaded()]  # type: ignore[union-attr]
        return JSONResponse(
            {"status": status, "models": self.pool.names, "loaded": loaded, "engines": self.pool.kinds()}
        )

    def models(self) -> dict[str, Any]:
        """OpenAI's list, each entry also saying whether it is loaded now (Ollama, LM Studio do)."""
        data = [
            {"id": m["id"], "object": "model", "created": 0, "owned_by": "llmhost", "loaded": m["loaded"]}
            for m in self.pool.listing()
        ]
        return {"object": "list", "data": data}

    def ps(self) -> dict[str, Any]:
        """What `llmhost ps` shows: the loaded models, their memory, requests and idle time."""
        return {"models": self.pool.ps(), "budget_gib": round(self.pool.budget_gib, 3)}

    async def complete(self, request: Request, protocol: Protocol) -> Response:
        """One reply in `protocol`'s shape: the body becomes one GenerationRequest, which the
        leased engine answers; the reply goes back streamed or whole."""
        body = await self.parse(request, protocol.body)
        value = protocol.request(body, self.defaults)
        lease = await self.pool.aacquire(value.model)  # loads the model if it is not loaded
        try:
            engine = lease.engine
            chunks = await engine.astream(value)
            reply = protocol.reply(body, value, engine.name)
            if not protocol.streams(body):
                got = await self._gather(request, chunks, value.cancel)
                lease.release()
                self.metrics.finished(got[-1])
                return JSONResponse(reply.whole(collect(got)))
        except BaseException:
            lease.release()
            raise
        return _CancellingStream(
            self._sse(chunks, reply, request.url.path),
            value.cancel,  # set when the client goes: a queued or running request ends
            lease.release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def count_tokens(self, request: Request, messages: Messages) -> dict[str, int]:
        """Anthropic's count_tokens: the prompt a Messages body makes, counted by its model."""
        body = await self.parse(request, CountTokensRequest)
        value = messages.request(body, self.defaults)
        _, count = await self._on_model(value.model, lambda e: asyncio.to_thread(e.count_tokens, value))
        return {"input_tokens": count}

    async def embeddings(self, request: Request) -> JSONResponse:
        """OpenAI embeddings from an embedding model (a chat model answers 400 saying so); the
        body is plain JSON, skipping FastAPI's encoder, which walks every float of every vector
        (it took longer than one short text's forward pass)."""
        body = await self.parse(request, EmbeddingsRequest)
        value = await asyncio.to_thread(body.request) if body.openai_ids else body.request()
        name, embedded = await self._on_model(value.model, lambda e: e.aembed(value))
        return JSONResponse(render_embeddings(embedded, name, body.encoding_format))

    async def rerank(self, request: Request, shape: type[RerankBody]) -> dict[str, Any]:
        """Documents ranked for a query by a reranker, in Jina's / Cohere's shape."""
        body = await self.parse(request, shape)
        value = body.request()
        name, scored = await self._on_model(value.model, lambda e: e.arerank(value))
        return body.render(scored, name)

    async def score(self, request: Request) -> dict[str, Any]:
        """vLLM's pair scores: each pair a request of its own, batched together by the engine."""
        body = await self.parse(request, ScoreBody)
        values = body.requests()
        name, scored = await self._on_model(
            body.model, lambda e: asyncio.gather(*(e.arerank(v) for v in values))
        )
        return render_scores(list(scored), name)

    async def _on_model(self, model: str | None, work: Callable[[Engine], Awaitable[T]]) -> tuple[str, T]:
        """`work` on the model's engine (loaded if need be), held until it is done: the name
        the model answered under and what the work returned."""
        lease = await self.pool.aacquire(model)
        try:
            return lease.engine.name, await work(lease.engine)
        finally:
            lease.release()

    async def _gather(
        self, request: Request, chunks: AsyncIterator[Chunk], cancel: threading.Event
    ) -> list[Chunk]:
        """Collect a whole reply while watching the connection: a client that hangs up, whether
        its request is queued or running, cancels it at once (not when the next chunk comes)."""

        async def collect_all() -> list[Chunk]:
            async with contextlib.aclosing(chunks):  # closing it cancels the request in the engine
                return [chunk async for chunk in chunks]

        work = asyncio.ensure_future(collect_all())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            cancel.set()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ApiError(499, "the client closed the connection", "invalid_request_error")
        return work.result()

    async def _sse(self, chunks: AsyncIterator[Chunk], reply: Reply, path: str) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                for frame in reply.events(chunk):
                    yield frame
                if chunk.finish_reason is not None:
                    self.metrics.finished(chunk)
        except Exception as err:  # headers are sent: report in-band, then end the stream properly
            log.exception("generation failed mid-stream")
            api = (
                ApiError.from_llmhost(err)
                if isinstance(err, LlmhostError)
                else ApiError(500, f"generation failed: {err}", "server_error")
            )
            for frame in reply.failed(api.body(path)):
                yield frame
        for frame in reply.end():
            yield frame


class _CancellingStream(StreamingResponse):
    """A streamed reply that cancels its request however the response ends: a client that hangs
    up before the first chunk leaves a body generator that never started, whose own cleanup
    would never run."""

    def __init__(
        self, content: AsyncIterator[str], cancel: threading.Event, release: Any, **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.cancel, self.release = cancel, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()  # after a finished reply this changes nothing
            self.release()  # the model may be unloaded once no reply uses it


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gate:
    """Pure ASGI middleware (streams pass through untouched): API keys, request counts, requests
    in flight, and 503 for new requests while draining for shutdown."""

    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        try:
            if self.api.draining and path != "/health":
                raise ApiError(
                    503,
                    "the server is shutting down; retry shortly",
                    "server_error",
                    code="shutting_down",
                    headers={"Retry-After": "5", "Connection": "close"},
                )
            if path != "/health":
                headers = dict(scope["headers"])
                self.api.check_key(
                    headers.get(b"authorization", b"").decode("latin-1"),
                    headers.get(b"x-api-key", b"").decode("latin-1"),
                )
        except ApiError as err:
            self._count(path, err.status)
            return await err.response(path)(scope, receive, send)
        status = 500
        if scope["method"] == "POST":
            try:
                receive = self._limited(scope, receive)
            except ApiError as err:
                self._count(path, err.status)
                return await err.response(path)(scope, receive, send)

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.api.in_flight += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.api.in_flight -= 1
            self._count(path, status)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """Refuse a body over --max-body-mib: at once when Content-Length says so, else as soon
        as the bytes received pass it (a chunked upload), without reading the rest."""
        limit = self.api.max_body
        too_big = ApiError(
            413,
            f"the request body is larger than {limit / 2**20:g} MiB (--max-body-mib)",
            "invalid_request_error",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        seen = 0

        async def counting() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_big
            return message

        return counting

    def _count(self, path: str, status: int) -> None:
        if path.startswith("/v1/") or path in ("/rerank", "/v2/rerank", "/score"):
            self.api.metrics.requests.labels(path, str(status)).inc()


def _handler(api: Api, protocol: Protocol) -> Any:
    async def handle(request: Request) -> Response:
        return await api.complete(request, protocol)

    handle.__name__ = protocol.path.strip("/").replace("/", "_")
    return handle


def _counter(api: Api, messages: Messages) -> Any:
    async def count_tokens(request: Request) -> dict[str, int]:
        return await api.count_tokens(request, messages)

    return count_tokens


def _ranker(api: Api, shape: type[RerankBody]) -> Any:
    async def rerank(request: Request) -> dict[str, Any]:
        return await api.rerank(request, shape)

    return rerank


def create_app(pool: ModelPool, settings: ServerSettings) -> FastAPI:
    api = Api(pool, settings)
    app = FastAPI(title="llmhost", version=__version__, docs_url=None, redoc_url=None)
    app.state.api = api

    # every error in the shape of the protocol its path belongs to
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response(request.url.path)

    @app.exception_handler(LlmhostError)
    async def _llmhost_error(request: Request, err: LlmhostError) -> JSONResponse:
        return ApiError.from_llmhost(err).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        invalid = ApiError(400, f"invalid request: {err.errors()}", "invalid_request_error")
        return invalid.response(request.url.path)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        path = request.url.path
        return ApiError(404, f"no route {request.method} {path}", "invalid_request_error").response(path)

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        path = request.url.path
        return ApiError(405, f"{request.method} is not allowed on {path}", "invalid_request_error").response(
            path
        )

    # these read the store (serve --all) or measure free memory: FastAPI runs plain `def`
    # routes in its thread pool, off the event loop
    @app.get("/health")
    def health() -> JSONResponse:
        return api.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(api.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return api.models()

    @app.get("/api/ps")
    def ps() -> dict[str, Any]:
        return api.ps()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        return await api.embeddings(request)

    # rerank at every path its clients call; all of them behind the API key (the Gate)
    for path, shape in (("/v1/rerank", RerankBody), ("/rerank", RerankBody), ("/v2/rerank", RerankV2Body)):
        app.add_api_route(path, _ranker(api, shape), methods=["POST"])
    for path in ("/v1/score", "/score"):
        app.add_api_route(path, api.score, methods=["POST"])

    for protocol in api.protocols:
        app.add_api_route(protocol.path, _handler(api, protocol), methods=["POST"])
        if isinstance(protocol, Messages):
            app.add_api_route(f"{protocol.path}/count_tokens", _counter(api, protocol), methods=["POST"])
        if isinstance(protocol, Responses):
            app.add_api_route(f"{protocol.path}/{{response_id}}", protocol.retrieve, methods=["GET"])
            app.add_api_route(f"{protocol.path}/{{response_id}}", protocol.delete, methods=["DELETE"])

    app.add_middleware(Gate, api=api)
    return app
