"""GGUF rerankers on llama.cpp (rank pooling), scored as the transformers side scores them:

- a cross-encoder (BERT, XLM-R: bge-reranker-v2-m3 as llama.cpp's converter writes it): the pair
  is read as one input, [CLS] query [SEP] document [SEP] (XLM-R: <s> query </s></s> document
  </s>), and the score is the sigmoid of the head's logit, as sentence-transformers' CrossEncoder
  gives it (llama.cpp's server answers the raw logit);
- Qwen3-Reranker (the converter turns the yes and no rows of its output layer into a two-label
  head and llama.cpp takes their softmax): the pair goes into the model card's prompt, the
  request's `instruction` included, and the score is p(yes).

Unlike llama.cpp's server, the prompt's control tokens are parsed apart from the user's text, so
a document never turns into control tokens. A BERT cross-encoder (ms-marco-MiniLM) is refused:
llama.cpp's converter leaves out the pooler layer its classifier reads (and llama.cpp reads every
token as the first segment), so its scores would not be the model's; XLM-R's head (a dense layer,
then the output) is kept whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.backends.llamacpp.embedding import LlamaCppEncoder
from llmhost.engine.backends.llamacpp.offload import GgufFacts
from llmhost.engine.chunks import Scored
from llmhost.engine.encoder import Row
from llmhost.engine.request import RerankRequest
from llmhost.engine.rerank import YES_NO_MAX, YES_NO_PREFIX, YES_NO_SUFFIX, yes_no_text
from llmhost.errors import LlmhostError

#: llama.cpp's architectures whose rank head is Qwen3-Reranker's yes/no softmax.
YES_NO_ARCHS = ("qwen3", "qwen3vl")


class LlamaCppRerankEngine(LlamaCppEncoder):
    """A GGUF reranker; the pairs of concurrent requests share `llama_decode` calls."""

    task = "rerank"

    def __init__(self, llm: Any, name: str) -> None:
        import llama_cpp

        super().__init__(llm, name)
        model = llm.model
        self.yes_no = llama_cpp.llama_model_chat_template(model, b"rerank") is not None or (
            llama_cpp.llama_model_cls_label(model, 0) == b"yes"
        )
        outputs = llama_cpp.llama_model_n_cls_out(model)
        if self.yes_no:
            self._ends = (self._special(YES_NO_PREFIX), self._special(YES_NO_SUFFIX))
        elif outputs != 1:
            llm.close()
            raise LlmhostError(
                f"{name}: a classifier with {outputs} labels is not a reranker (a reranker gives one score)"
            )
        vocab = llama_cpp.llama_model_get_vocab(model)
        # between query and document: XLM-R and RoBERTa repeat their separator (</s></s>), BERT
        # does not; llama.cpp's flags say which ("add_sep" beside "add_eos")
        sep = llama_cpp.llama_vocab_sep(vocab)
        paired = llama_cpp.llama_vocab_get_add_sep(vocab) and llama_cpp.llama_vocab_get_add_eos(vocab)
        self._middle = [sep] if paired and sep >= 0 else []

    @classmethod
    def load(
        cls, gguf: Path, settings: LoadSettings, name: str, facts: GgufFacts, window: int
    ) -> LlamaCppRerankEngine:
        import llama_cpp

        if facts.arch == "bert" and facts.classifier and not facts.classifier_dense:
            raise LlmhostError(
                f"{gguf.name} is a BERT cross-encoder, and llama.cpp's converter leaves out the pooler "
                "layer its classifier reads: its scores would not be the model's. Serve the "
                "reranker's safetensors folder (the transformers engine)"
            )
        if facts.arch in YES_NO_ARCHS:
            window = min(window, YES_NO_MAX)
        # a converted cross-encoder names no pooling: rank is asked for, as `llama-server --rerank` does
        return cls.open(gguf, settings, facts, name, window, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK)

    def rerank(self, request: RerankRequest) -> Scored:
        return self._result(self._submit(lambda: self._rows(request)))

    async def arerank(self, request: RerankRequest) -> Scored:
        return self._result(await self._asubmit(lambda: self._rows(request)))

    def _special(self, text: str) -> list[int]:
        """llmhost's own prompt text, control tokens parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _rows(self, request: RerankRequest) -> list[Row]:
        if self.yes_no:
            head, tail = self._ends
            room = self.context_length - len(head) - len(tail)
            return [{"input_ids": [*head, *self._tokens(t)[:room], *tail]} for t in yes_no_text(request)]
        before, after = self._around
        room = self.context_length - len(before) - 2 * len(after) - len(self._middle)
        query = self._tokens(request.query)
        rows = []
        for doc in request.documents:
            q, d = longest_first(query, self._tokens(doc), room)
            rows.append({"input_ids": [*before, *q, *after, *self._middle, *d, *after]})
        return rows

    def _read(self, seq: int, ids: list[int]) -> tuple[float, int]:
        import llama_cpp

        score = float(llama_cpp.llama_get_embeddings_seq(self.llm._ctx.ctx, seq)[0])
        if not self.yes_no:  # the head's logit; p(yes) already comes out of llama.cpp's softmax
            score = 1.0 / (1.0 + math.exp(-score)) if score > -700 else 0.0
        return score, len(ids)

    @staticmethod
    def _result(outputs: list[tuple[float, int]]) -> Scored:
        return Scored([score for score, _ in outputs], sum(n for _, n in outputs))


def longest_first(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    """A pair cut to `room` tokens the way tokenizers' `longest_first` cuts it: the longer side
    loses tokens from its end until both fit (a short query stays whole)."""
    if len(a) + len(b) <= room:
        return a, b
    half = room // 2
    if len(a) <= half:
        return a, b[: room - len(a)]
    if len(b) <= half:
        return a[: room - len(b)], b
    return a[: room - half], b[:half]
