"""GGUF embedding models on llama.cpp (a BERT, XLM-R, nomic-bert or Qwen3-Embedding converted by
llama.cpp's converter): the GGUF says it embeds by carrying a pooling type, which llama.cpp then
applies (mean, CLS, last token). Rows of concurrent requests share `llama_decode` calls (the
same `Batcher` as the transformers side); vectors come back unit length, as llama.cpp's server
gives them. `LlamaCppEncoder` is what embedding and rerank GGUFs (rerank.py) share.

A GGUF carries no sentence-transformers `max_seq_length`: inputs are read up to the model's
trained window (512 for all-MiniLM-L6-v2, whose sentence-transformers setting is 256), the
closing special token kept, as llama.cpp's server reads them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

from llmhost.config import LoadSettings
from llmhost.engine.backends.llamacpp.offload import GgufFacts, open_offloaded
from llmhost.engine.chunks import Embedded
from llmhost.engine.encoder import EncoderEngine, Row, fitted
from llmhost.engine.request import EmbedRequest
from llmhost.errors import InvalidRequestError, LlmhostError

E = TypeVar("E", bound="LlamaCppEncoder")


class LlamaCppEncoder(EncoderEngine):
    """One llama.cpp context that holds a whole batch of sequences; `_read` turns what llama.cpp
    pooled for one sequence into that row's output."""

    kind = "llamacpp"

    def __init__(self, llm: Any, name: str) -> None:
        super().__init__(llm, None, name, "cpu", llm.n_ctx())
        self.llm = llm
        # the special tokens the model puts around a text ([CLS] … [SEP]), found from a sample
        bare = llm.tokenize(b"a", add_bos=False, special=False)
        full = llm.tokenize(b"a", add_bos=True, special=False)
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self._around = (full[:at], full[at + len(bare) :])

    @classmethod
    def open(
        cls: type[E],
        gguf: Path,
        settings: LoadSettings,
        facts: GgufFacts,
        name: str,
        window: int,
        **options: Any,
    ) -> E:
        window = settings.context_length or window
        # a non-causal model reads each sequence in one ubatch: the batch holds a whole window
        llm, device = open_offloaded(
            gguf,
            settings,
            facts,
            embedding=True,
            n_ctx=window,
            n_batch=window,
            n_ubatch=window,
            n_seq_max=64,
            **options,
        )
        engine = cls(llm, name)
        engine.placement = device
        return engine

    def _tokens(self, text: str) -> list[int]:
        """User text as plain text: control-token spellings in it stay text."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _read(self, seq: int, ids: list[int]) -> Any:
        raise NotImplementedError

    def _run(self, rows: list[Row]) -> list[Any]:
        """Rows decoded in as few llama_decode calls as the context's batch allows."""
        llm, outputs = self.llm, []
        limit, seqs = llm.n_batch, llm.context_params.n_seq_max
        group: list[list[int]] = []

        def decode() -> None:
            llm._ctx.kv_cache_clear()
            llm._batch.reset()
            for seq, ids in enumerate(group):
                llm._batch.add_sequence(ids, seq, True)
            llm._ctx.decode(llm._batch)
            outputs.extend(self._read(seq, ids) for seq, ids in enumerate(group))
            group.clear()

        for row in rows:
            ids = row["input_ids"]
            if group and (sum(map(len, group)) + len(ids) > limit or len(group) >= seqs):
                decode()
            group.append(ids)
        if group:
            decode()
        llm._ctx.kv_cache_clear()
        return outputs

    def close(self) -> None:
        super().close()
        self.llm.close()


class LlamaCppEmbeddingEngine(LlamaCppEncoder):
    """A GGUF embedding model."""

    task = "embed"

    @classmethod
    def load(
        cls, gguf: Path, settings: LoadSettings, name: str, facts: GgufFacts, pooling: str, window: int
    ) -> LlamaCppEmbeddingEngine:
        if pooling not in ("mean", "cls", "last"):
            raise LlmhostError(
                f"{gguf.name} is an encoder whose GGUF says no pooling ({pooling}): llmhost serves GGUF "
                "embedding models with mean, CLS or last-token pooling; convert it from its "
                "sentence-transformers folder, or serve that folder"
            )
        return cls.open(gguf, settings, facts, name, window)

    def embed(self, request: EmbedRequest) -> Embedded:
        self._check(request)
        return self._result(self._submit(lambda: self._rows(request)))

    async def aembed(self, request: EmbedRequest) -> Embedded:
        self._check(request)
        return self._result(await self._asubmit(lambda: self._rows(request)))

    def _check(self, request: EmbedRequest) -> None:
        if request.dimensions is not None and request.dimensions != self.llm.n_embd():
            raise InvalidRequestError(
                f"{self.name} gives {self.llm.n_embd()}-dimensional vectors; a GGUF does not say it was "
                "trained to be shortened (Matryoshka): leave dimensions out",
                "dimensions",
            )
        if request.prompt is not None and not request.prompt_optional:
            raise InvalidRequestError(
                f"{self.name} is a GGUF, which carries no sentence-transformers prompts: put the prompt "
                "before the text yourself",
                "prompt_name",
            )

    def _rows(self, request: EmbedRequest) -> list[Row]:
        before, after = self._around
        room = self.context_length - len(before) - len(after)
        rows = []
        vocab = self.llm.n_vocab()
        for index, item in enumerate(request.inputs):
            if isinstance(item, str):
                ids = self._tokens(item)
            else:
                bad = next((t for t in item if not 0 <= t < vocab), None)
                if bad is not None:
                    raise InvalidRequestError(
                        f"input[{index}] holds the token id {bad}, outside this model's vocabulary "
                        f"of {vocab}",
                        f"input.{index}",
                    )
                ids = list(item)
            rows.append(
                {"input_ids": [*before, *fitted(ids, room, request.truncate, index, self.name), *after]}
            )
        return rows

    def _read(self, seq: int, ids: list[int]) -> tuple[list[float], int]:
        import llama_cpp

        vector = llama_cpp.llama_get_embeddings_seq(self.llm._ctx.ctx, seq)[: self.llm.n_embd()]
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector], len(ids)

    @staticmethod
    def _result(outputs: list[tuple[list[float], int]]) -> Embedded:
        return Embedded([vector for vector, _ in outputs], sum(n for _, n in outputs))
