"""Rerankers: a relevance score for each (query, document) pair, read the way the model defines it.

Two kinds, told apart by the model's files (and, for the second, by what the catalog or the
import declared, since its files are a chat model's):

- a cross-encoder (`*ForSequenceClassification` with one label: bge-reranker-v2-m3,
  ms-marco-MiniLM): the pair is read as one input, the score is the sigmoid of its logit, or
  the raw logit where sentence-transformers' saved `activation_fn` says Identity;
- Qwen3-Reranker (a causal LM asked "yes" or "no"): the pair goes into its documented prompt and
  the score is p(yes) against p(no) at the answer's position. User text is tokenized with
  special tokens split, so a document never turns into control tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmhost.config import LoadSettings
from llmhost.engine.chunks import Scored
from llmhost.engine.encoder import EncoderEngine, Row, last_index
from llmhost.engine.request import RerankRequest
from llmhost.errors import LlmhostError

Scoring = Literal["cross-encoder", "yes-no"]
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}

# Qwen3-Reranker's prompt, from its model card: the instruction, the query and the document go
# into one user turn; the answer's first token is read as yes or no.
YES_NO_SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'  # noqa: E501
YES_NO_PREFIX = f"<|im_start|>system\n{YES_NO_SYSTEM}<|im_end|>\n<|im_start|>user\n"
YES_NO_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
YES_NO_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES_NO_MAX = 8192


def yes_no_text(request: RerankRequest) -> list[str]:
    """Each document's user turn in Qwen3-Reranker's prompt (between YES_NO_PREFIX and _SUFFIX)."""
    head = f"<Instruct>: {request.instruction or YES_NO_INSTRUCTION}\n<Query>: {request.query}\n<Document>: "
    return [head + doc for doc in request.documents]


class YesNoPrompt:
    """Qwen3-Reranker's prompt as token ids, with a Hugging Face tokenizer: the prompt's own
    control tokens are read as control tokens, the user's text as text (a document that spells
    `<|im_end|>` stays text), cut to leave room for the prompt within `limit`."""

    def __init__(self, tokenizer: Any, limit: int) -> None:
        self.tokenizer = tokenizer
        self.before, self.after = self._ids([YES_NO_PREFIX, YES_NO_SUFFIX], split=False)
        self.room = min(limit, YES_NO_MAX) - len(self.before) - len(self.after)

    def rows(self, request: RerankRequest) -> list[list[int]]:
        return [[*self.before, *ids[: self.room], *self.after] for ids in self._ids(yes_no_text(request))]

    def _ids(self, texts: list[str], split: bool = True) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split)["input_ids"]


@dataclass(frozen=True)
class RerankSpec:
    scoring: Scoring
    activation: str = "sigmoid"


def read_rerank_spec(folder: Path, declared: str | None = None) -> RerankSpec | None:
    """The folder's reranking setup, or None when it is not a reranker; `declared` is the task the
    catalog or the import gave the model ("rerank" for Qwen3-Reranker's causal-LM files)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
        if labels != 1:
            raise LlmhostError(
                f"{folder}: a classifier with {labels} labels is not a reranker (a reranker gives one score)"
            )
        st = config.get("sentence_transformers") or {}
        name = str(st.get("activation_fn") or config.get("sbert_ce_default_activation_function") or "Sigmoid")
        activation = ACTIVATIONS.get(name.rsplit(".", 1)[-1])
        if activation is None:
            raise LlmhostError(
                f"{folder}: the cross-encoder activation {name} is not supported (Sigmoid, Identity)"
            )
        return RerankSpec("cross-encoder", activation)
    if declared != "rerank":
        return None
    if any(a.endswith("ForCausalLM") for a in architectures):
        return RerankSpec("yes-no")
    raise LlmhostError(
        f"{folder} is declared a reranker but is neither a cross-encoder (*ForSequenceClassification) "
        f"nor a yes/no causal LM (architectures: {', '.join(architectures) or 'none'})"
    )


def yes_no_ids(tokenizer: Any, name: str) -> list[int]:
    """The ids of "no" and "yes", whose logits at the answer's position make the score."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes")]
    if tokenizer.unk_token_id in ids or None in ids:
        raise LlmhostError(f"{name}: its vocabulary lacks the tokens 'yes' and 'no' a yes/no reranker reads")
    return ids


class RerankEngine(EncoderEngine):
    """A reranker on transformers; the pairs of concurrent requests share forward passes."""

    task = "rerank"

    def __init__(self, model: Any, tokenizer: Any, spec: RerankSpec, name: str, device: str) -> None:
        config = model.config
        limit = int(min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512)))
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):
            limit = min(
                limit, config.max_position_embeddings - (config.pad_token_id or 1) - 1
            )  # positions start past padding
        if spec.scoring == "yes-no":
            limit = min(limit, YES_NO_MAX)
        super().__init__(model, tokenizer, name, device, limit)
        self.spec = spec
        if spec.scoring == "yes-no":
            self._answers = yes_no_ids(tokenizer, name)
            self._prompt = YesNoPrompt(tokenizer, limit)

    @classmethod
    def load(cls, folder: Path, spec: RerankSpec, settings: LoadSettings, name: str) -> RerankEngine:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForCausalLM if spec.scoring == "yes-no" else AutoModelForSequenceClassification
        tokenizer, model, device = cls.load_parts(folder, settings, auto)
        return cls(model, tokenizer, spec, name, device)

    def rerank(self, request: RerankRequest) -> Scored:
        return self._result(self._submit(lambda: self._rows(request)))

    async def arerank(self, request: RerankRequest) -> Scored:
        return self._result(await self._asubmit(lambda: self._rows(request)))

    def _rows(self, request: RerankRequest) -> list[Row]:
        docs = request.documents
        if self.spec.scoring == "cross-encoder":
            pairs = self.tokenizer(
                [request.query] * len(docs), docs, truncation=True, max_length=self.context_length,
                split_special_tokens=True,
            )  # fmt: skip
            return [
                {k: pairs[k][i] for k in pairs if k != "attention_mask"}  # the batch pads its own mask
                for i in range(len(docs))
            ]
        return [{"input_ids": ids} for ids in self._prompt.rows(request)]

    def _forward(self, batch: dict[str, Any]) -> list[Any]:
        import torch

        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        if self.spec.scoring == "cross-encoder":
            logits = self.model(**batch).logits[:, 0].float()
            scores = torch.sigmoid(logits) if self.spec.activation == "sigmoid" else logits
        else:
            # only the answer position's "no" and "yes" logits: two rows of the output head
            hidden = self.model.base_model(**batch).last_hidden_state
            last = hidden[torch.arange(hidden.shape[0]), last_index(mask)]
            head = self.model.get_output_embeddings()
            logits = last @ head.weight[self._answers].T
            if head.bias is not None:
                logits = logits + head.bias[self._answers]
            scores = torch.softmax(logits.float(), dim=1)[:, 1]
        return list(zip(scores.cpu().tolist(), lengths, strict=True))

    @staticmethod
    def _result(outputs: list[tuple[float, int]]) -> Scored:
        return Scored([score for score, _ in outputs], sum(n for _, n in outputs))
