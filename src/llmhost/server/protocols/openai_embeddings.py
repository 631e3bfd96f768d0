"""OpenAI embeddings (`POST /v1/embeddings`), what RAG stacks call: the body, the inputs it asks
for, and the `list` of `embedding` objects (floats, or base64 of little-endian float32, the
`openai` SDK's default)."""

from __future__ import annotations

import base64
import struct
import threading
import time
from concurrent.futures import Future, TimeoutError
from typing import Any, Literal

from pydantic import Field, field_validator

from llmhost.engine.chunks import Embedded
from llmhost.engine.request import EmbedRequest
from llmhost.errors import InvalidRequestError
from llmhost.server.protocols.base import Lenient

#: Most inputs in one request (OpenAI's own limit).
MAX_INPUTS = 2048
#: cl100k's ordinary tokens are 0-100255; its special tokens (<|endoftext|>, …) come after.
CL100K_ORDINARY = 100256


class EmbeddingsRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] | list[list[int]] | list[int] = Field(
        description="A text, texts, one list of token ids, or lists of them (whose ids: token_ids)."
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
    token_ids: Literal["cl100k", "model"] = Field(
        "cl100k",
        description="Whose token ids `input` holds: OpenAI's cl100k (what LangChain's OpenAIEmbeddings "
        "and OpenAI's cookbook send for a model tiktoken does not know), read back into text for the "
        "model's own tokenizer; or the model's own ids.",
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

    @property
    def openai_ids(self) -> bool:
        """Its input is cl100k token ids, which `request` reads back into text (the first time,
        tiktoken may download cl100k: call it off the event loop)."""
        return self.token_ids == "cl100k" and isinstance(self.input[0], list)

    def request(self) -> EmbedRequest:
        cut = self.truncate not in (False, "NONE")
        inputs = read_cl100k(self.input) if self.openai_ids else self.input  # type: ignore[arg-type]
        if self.prompt_name is not None or self.input_type is None:
            return EmbedRequest(inputs, self.model, self.dimensions, self.prompt_name, truncate=cut)
        # input_type is a hint: the model's prompt of that name where it has one
        prompt = INPUT_TYPES.get(self.input_type, self.input_type)
        return EmbedRequest(inputs, self.model, self.dimensions, prompt, True, cut)


#: Other APIs' input types → sentence-transformers' usual prompt names.
INPUT_TYPES = {"search_query": "query", "search_document": "document", "passage": "document"}


def read_cl100k(inputs: list[list[int]]) -> list[str]:
    """Token ids in OpenAI's cl100k back into text. LangChain's OpenAIEmbeddings splits long texts
    by cl100k tokens and sends the ids for any model tiktoken does not know; each becomes the text
    it was, which the model then reads with its own tokenizer."""
    for i, ids in enumerate(inputs):
        bad = next((t for t in ids if not 0 <= t < CL100K_ORDINARY), None)
        if bad is not None:
            raise InvalidRequestError(
                f"input[{i}] holds the token id {bad}, which is not one of OpenAI's cl100k tokens "
                f'(0-{CL100K_ORDINARY - 1}): send text, or "token_ids": "model" for the model\'s own ids',
                "input",
            )
    encoding = CL100K.get()
    return [encoding.decode(ids) for ids in inputs]


class Cl100k:
    """OpenAI's cl100k_base from tiktoken, which downloads it once into its cache, with no
    timeout: behind a firewall that drops packets a request would wait minutes, and the next one
    again. The load runs on a thread of its own and is waited for `wait` seconds; a failure is
    remembered for `retry` seconds, so the requests after it are answered at once."""

    def __init__(self, wait: float = 15.0, retry: float = 300.0) -> None:
        self.wait, self.retry = wait, retry
        self._lock = threading.Lock()
        self._loading: Future[Any] | None = None
        self._failed: tuple[float, str] | None = None  # when, and why

    def get(self) -> Any:
        with self._lock:
            loading = self._loading
            if loading is not None and loading.done() and loading.exception() is None:
                return loading.result()  # loaded, perhaps after a request gave up waiting
            if self._failed is not None and time.monotonic() - self._failed[0] < self.retry:
                raise self._refusal(self._failed[1])
            if loading is None or loading.done():  # never tried, or failed: try again
                loading = self._loading = Future()
                threading.Thread(target=self._load, args=(loading,), daemon=True).start()
        try:
            return loading.result(timeout=self.wait)
        except TimeoutError:
            reason = f"no answer from its download in {self.wait:g} s"
        except Exception as err:
            reason = type(err).__name__
        with self._lock:
            self._failed = (time.monotonic(), reason)
        raise self._refusal(reason)

    @staticmethod
    def _load(loading: Future[Any]) -> None:
        try:
            import tiktoken  # which keeps each encoding it loads

            loading.set_result(tiktoken.get_encoding("cl100k_base"))
        except Exception as err:  # offline, it cannot download it
            loading.set_exception(err)

    @staticmethod
    def _refusal(reason: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"the input is token ids, read as OpenAI's cl100k, and tiktoken could not load cl100k_base "
            f"({reason}): send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)), or "
            "put cl100k_base in tiktoken's cache (TIKTOKEN_CACHE_DIR) where the server runs",
            "input",
        )


#: One per process, as tiktoken's own cache of loaded encodings is.
CL100K = Cl100k()


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
