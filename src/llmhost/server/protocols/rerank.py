"""Rerank, as RAG stacks call it: `POST /v1/rerank` and `/rerank` (Jina's and Cohere's v1 shape,
which Dify, RAGFlow, FastGPT and Xinference clients send), `/v2/rerank` (Cohere v2) and
`/v1/score` (vLLM's pair scoring). Each body becomes one `RerankRequest`; results come back
sorted by relevance, best first, each with the document's index in the request."""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from llmhost.engine.chunks import Scored
from llmhost.engine.request import RerankRequest
from llmhost.server.protocols.base import Lenient

#: Most documents in one request (Cohere's limit).
MAX_DOCUMENTS = 1000


class Document(Lenient):
    text: str


class RerankBody(Lenient):
    """Jina / Cohere v1: documents as strings or `{text}` objects; documents come back unless
    `return_documents` is false (Jina's and vLLM's default)."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1, max_length=1_000_000)
    documents: list[str | Document] = Field(max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
    instruction: str | None = Field(None, max_length=10_000, description="Qwen3-Reranker's task description.")

    @field_validator("documents")
    @classmethod
    def _some(cls, value: list[str | Document]) -> list[str | Document]:
        if not value:
            raise ValueError("documents is empty: send at least one document to rank")
        return value

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def request(self) -> RerankRequest:
        return RerankRequest(self.query, self.texts, self.model, self.instruction)

    def render(self, scored: Scored, model: str) -> dict[str, Any]:
        ranked = sorted(enumerate(scored.scores), key=lambda pair: -pair[1])[: self.top_n]
        texts = self.texts
        results = [
            {
                "index": i,
                "relevance_score": score,
                **({"document": {"text": texts[i]}} if self.return_documents else {}),
            }
            for i, score in ranked
        ]
        usage = {"prompt_tokens": scored.prompt_tokens, "total_tokens": scored.prompt_tokens}
        meta = {"api_version": {"version": self.version}, "billed_units": {"search_units": 1}}
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": model,
            "results": results,
            "usage": usage,
            "meta": meta,
        }

    version: ClassVar[str] = "1"


class RerankV2Body(RerankBody):
    """Cohere v2: the same call; results carry no documents (v2 dropped return_documents)."""

    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1)
    version: ClassVar[str] = "2"


class ScoreBody(Lenient):
    """vLLM's `/v1/score`: `text_1` against each of `text_2` (one text or a list), or pairs of
    two equally long lists."""

    model: str = Field(min_length=1)
    text_1: str | list[str]
    text_2: str | list[str]

    @model_validator(mode="after")
    def _paired(self) -> ScoreBody:
        first, second = self._lists()
        if not first or not second:
            raise ValueError("text_1 and text_2 need at least one text each")
        if len(first) not in (1, len(second)):
            raise ValueError(f"text_1 has {len(first)} texts and text_2 {len(second)}: send one, or as many")
        if len(second) > MAX_DOCUMENTS:
            raise ValueError(f"{len(second)} pairs; at most {MAX_DOCUMENTS} per request")
        return self

    def _lists(self) -> tuple[list[str], list[str]]:
        return (
            [self.text_1] if isinstance(self.text_1, str) else self.text_1,
            [self.text_2] if isinstance(self.text_2, str) else self.text_2,
        )

    def requests(self) -> list[RerankRequest]:
        """One request per pair (they share forward passes in the engine's batches)."""
        first, second = self._lists()
        if len(first) == 1:
            return [RerankRequest(first[0], second, self.model)]
        return [RerankRequest(q, [d], self.model) for q, d in zip(first, second, strict=True)]


def render_scores(scored: list[Scored], model: str) -> dict[str, Any]:
    tokens = sum(s.prompt_tokens for s in scored)
    scores = [score for s in scored for score in s.scores]
    data = [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)]
    return {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
