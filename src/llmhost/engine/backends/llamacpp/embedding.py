"""GGUF embedding models on llama.cpp (a BERT, XLM-R, nomic-bert or Qwen3-Embedding converted by
llama.cpp's converter): the GGUF says it embeds by carrying a pooling type, which llama.cpp then
applies (mean, CLS, last token). Rows of concurrent requests share `llama_decode` calls (the
same `Batcher` as the transformers side); vectors come back unit length, as llama.cpp's server
gives them.

A GGUF carries no sentence-transformers `max_seq_length`: inputs are read up to the model's
trained window (512 for all-MiniLM-L6-v2, whose sentence-transformers setting is 256), the
closing special token kept, as llama.cpp's server reads them. GGUF rerankers (rank pooling) are
not served here yet: their safetensors folder is, on transformers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.backends.llamacpp.offload import GgufFacts, open_offloaded
from llmhost.engine.chunks import Embedded
from llmhost.engine.encoder import EncoderEngine, Row, fitted
from llmhost.engine.request import EmbedRequest
from llmhost.errors import InvalidRequestError, LlmhostError


class LlamaCppEmbeddingEngine(EncoderEngine):
    """A GGUF embedding model: one llama.cpp context that holds a whole batch of sequences."""

    kind = "llamacpp"
    task = "embed"

    def __init__(self, llm: Any, name: str) -> None:
        super().__init__(llm, None, name, "cpu", llm.n_ctx())
        self.llm = llm
        # the special tokens the model puts around a text ([CLS] … [SEP]), found from a sample
        bare = llm.tokenize(b"a", add_bos=False, special=False)
        full = llm.tokenize(b"a", add_bos=True, special=False)
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self._around = (full[:at], full[at + len(bare) :])

    @classmethod
    def load(
        cls, gguf: Path, settings: LoadSettings, name: str, facts: GgufFacts, pooling: str, window: int
    ) -> LlamaCppEmbeddingEngine:
        if pooling == "rank":
            raise LlmhostError(
                f"{gguf.name} is a GGUF reranker: llmhost does not serve GGUF rerankers yet; serve the "
                "reranker's safetensors folder (the transformers engine or vLLM)"
            )
        if pooling not in ("mean", "cls", "last"):
            raise LlmhostError(
                f"{gguf.name} is an encoder whose GGUF says no pooling ({pooling}): llmhost serves GGUF "
                "embedding models with mean, CLS or last-token pooling; convert it from its "
                "sentence-transformers folder, or serve that folder"
            )
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
        )
        engine = cls(llm, name)
        engine.placement = device
        return engine

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
                ids = self.llm.tokenize(item.encode("utf-8"), add_bos=False, special=False)
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

    def _run(self, rows: list[Row]) -> list[Any]:
        """Rows decoded in as few llama_decode calls as the context's batch allows."""
        import llama_cpp

        llm, outputs = self.llm, []
        limit, seqs = llm.n_batch, llm.context_params.n_seq_max
        group: list[list[int]] = []

        def decode() -> None:
            llm._ctx.kv_cache_clear()
            llm._batch.reset()
            for seq, ids in enumerate(group):
                llm._batch.add_sequence(ids, seq, True)
            llm._ctx.decode(llm._batch)
            for seq, ids in enumerate(group):
                vector = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq)[: llm.n_embd()]
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                outputs.append(([x / norm for x in vector], len(ids)))
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

    @staticmethod
    def _result(outputs: list[tuple[list[float], int]]) -> Embedded:
        return Embedded([vector for vector, _ in outputs], sum(n for _, n in outputs))

    def close(self) -> None:
        super().close()
        self.llm.close()
