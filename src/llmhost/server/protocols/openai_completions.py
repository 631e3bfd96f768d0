"""OpenAI completions (`POST /v1/completions`): a plain prompt continued, as `text_completion`
objects."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from llmhost.engine.chunks import Chunk, Result, TokenLogprob
from llmhost.engine.params import MAX_TOP_LOGPROBS, make_params
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Defaults, Protocol
from llmhost.server.protocols.openai_common import OpenAIReply, Sampling, openai_finish, sampling_values


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class Completions(Protocol):
    path = "/v1/completions"
    body = CompletionRequest

    def request(self, body: CompletionRequest, defaults: Defaults) -> GenerationRequest:
        values = sampling_values(body, body.max_tokens)
        params = make_params(truncate_history=False, logprobs=body.logprobs, **values)
        return GenerationRequest(prompt=to_prompt(body), params=params, model=body.model)

    def reply(self, body: CompletionRequest, request: GenerationRequest, model: str) -> CompletionReply:
        return CompletionReply(model, body.include_usage, logprobs=body.logprobs is not None)


def to_prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise InvalidRequestError("prompt: send one prompt per request (a list of one string)", "prompt")
    return req.prompt[0]


def completion_logprobs(
    items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0
) -> dict[str, Any]:
    offsets = []
    for i in items:
        offsets.append(offset)
        offset += len(i.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{t: lp for t, lp, _ in i.top} for i in items],
        "text_offset": offsets,
    }


class CompletionReply(OpenAIReply):
    prefix = "cmpl"
    chunk_object = whole_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first = True
        self._offset = 0  # characters streamed so far (text_offset)

    def chunk_objects(self, chunk: Chunk) -> list[dict[str, Any]]:
        finish = openai_finish(chunk.finish_reason)
        if not (chunk.text or finish or self._first or chunk.logprobs):
            return []
        self._first = False
        lp = completion_logprobs(chunk.logprobs, self._offset) if self.logprobs else None
        self._offset += len(chunk.text)
        return [self._chunk({"index": 0, "text": chunk.text, "logprobs": lp, "finish_reason": finish})]

    def choice(self, result: Result) -> dict[str, Any]:
        logprobs = completion_logprobs(result.logprobs) if self.logprobs else None
        return {
            "index": 0,
            "text": result.text,
            "logprobs": logprobs,
            "finish_reason": openai_finish(result.finish_reason),
        }
