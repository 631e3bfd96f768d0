"""OpenAI embeddings (`POST /v1/embeddings`), what RAG stacks call: the body, the inputs it asks
for, and the `list` of `embedding` objects (floats, or base64 of little-endian float32, the
`openai` SDK's default)."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from pydantic import Field, field_validator

from llmhost.engine.chunks import Embedded
from llmhost.engine.request import EmbedRequest
from llmhost.server.protocols.base import Lenient

#: Most inputs in one request (OpenAI's own limit).
MAX_INPUTS = 2048


class EmbeddingsRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] | list[list[int]] | list[int] = Field(
        description="A text, texts, one list of token ids, or lists of them (the model's own ids)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = Field(None, max_length=256)
    prompt_name: str | None = Field(
        None,
        max_length=128,
        description="Which of the model's prompts goes first (sentence-transformers' name).",
    )
    truncate: bool | Literal["NONE", "END"] = Field(
        True,
        description="Cut inputs past the model's limit (true, Cohere's END) or answer 400 (false, NONE).",
    )
    input_type: str | None = Field(
        None,
        max_length=64,
        description="query or document (Cohere's, Voyage's and NVIDIA's field for the same).",
    )

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            value = [value]
        if not value:
            raise ValueError("input is empty: send a text or a list of texts")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input holds {len(value)} items; at most {MAX_INPUTS} per request")
        for i, item in enumerate(value):
            if not item:
                raise ValueError(f"input[{i}] is empty: every input needs some text")
        return value

    def request(self) -> EmbedRequest:
        cut = self.truncate not in (False, "NONE")
        if self.prompt_name is not None or self.input_type is None:
            return EmbedRequest(self.input, self.model, self.dimensions, self.prompt_name, truncate=cut)  # type: ignore[arg-type]
        # input_type is a hint: the model's prompt of that name where it has one
        prompt = INPUT_TYPES.get(self.input_type, self.input_type)
        return EmbedRequest(self.input, self.model, self.dimensions, prompt, True, cut)  # type: ignore[arg-type]


#: Other APIs' input types → sentence-transformers' usual prompt names.
INPUT_TYPES = {"search_query": "query", "search_document": "document", "passage": "document"}


def render(embedded: Embedded, model: str, encoding: str) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
        for i, vector in enumerate(embedded.vectors)
    ]
    usage = {"prompt_tokens": embedded.prompt_tokens, "total_tokens": embedded.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
