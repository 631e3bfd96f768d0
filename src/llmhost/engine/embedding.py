"""Embedding models: what a sentence-transformers folder says about itself (pooling, normalising,
the longest input), read from its files and never guessed from its name, and the engine that
runs it on transformers.

A folder is an embedding model when its `modules.json` lists a Pooling module; the Transformer
module's `sentence_bert_config.json` gives `max_seq_length`, the Pooling module's `config.json`
the pooling mode, and a Normalize module unit-length vectors. Inputs longer than
`max_seq_length` are truncated, as sentence-transformers does (the vector then describes the
first `max_seq_length` tokens; `usage.prompt_tokens` counts what was read).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmhost.config import LoadSettings
from llmhost.engine.base import Engine
from llmhost.engine.chunks import Chunk, Embedded
from llmhost.engine.request import GenerationRequest
from llmhost.errors import InvalidRequestError, LlmhostError

Pooling = Literal["cls", "mean", "max", "lasttoken"]
#: sentence-transformers' Pooling config keys → the modes llmhost runs.
POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Inputs embedded in one forward pass (sorted by length, so padding stays short).
BATCH = 32


@dataclass(frozen=True)
class EmbeddingSpec:
    pooling: Pooling
    normalize: bool
    dimension: int
    max_seq_length: int | None


def read_spec(folder: Path) -> EmbeddingSpec | None:
    """The folder's embedding setup, or None when it is not an embedding model; a module
    llmhost cannot run (Dense, a pooling mode it lacks) is an error that names it."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in kinds:
        return None
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise LlmhostError(f"{folder}: the sentence-transformers module {unknown[0]} is not supported yet")
    config = _json(folder / kinds["Pooling"].get("path", "1_Pooling") / "config.json")
    modes = [mode for key, mode in POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_KEYS]
    if len(modes) != 1 or others:
        raise LlmhostError(
            f"{folder}: pooling {sorted(others) or modes} is not supported (cls, mean, max, last token)"
        )
    settings = _json(folder / "sentence_bert_config.json")
    return EmbeddingSpec(
        pooling=modes[0],
        normalize="Normalize" in kinds,
        dimension=int(config["word_embedding_dimension"]),
        max_seq_length=settings.get("max_seq_length"),
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise LlmhostError(f"{path} is unreadable: {err}") from None


def pool(hidden: Any, mask: Any, mode: Pooling) -> Any:
    """One vector per sequence from the last hidden states (batch, tokens, dim) and the mask."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":  # right padding: the last real token of each row
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingEngine(Engine):
    """An embedding model on transformers: batched forward passes without gradients, one batch
    at a time (a lock; requests from many clients take turns)."""

    kind = "transformers"
    task = "embed"

    def __init__(self, model: Any, tokenizer: Any, spec: EmbeddingSpec, name: str, device: str) -> None:
        self.model, self.tokenizer, self.spec, self.name, self.device = model, tokenizer, spec, name, device
        self.context_length = spec.max_seq_length or int(tokenizer.model_max_length)
        self._lock = threading.Lock()
        # the special tokens the tokenizer puts around a text ([CLS] … [SEP], <s> … </s>), found
        # once from a sample: token-id inputs get the same, and truncation keeps room for them
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self._around = (full[:at], full[at + len(bare) :])

    @classmethod
    def load(cls, folder: Path, spec: EmbeddingSpec, settings: LoadSettings, name: str) -> EmbeddingEngine:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from llmhost.engine.backends.hf_folder import load_errors
        from llmhost.hardware import pick_device, pick_dtype

        device = pick_device(settings.device)
        dtype = getattr(torch, pick_dtype(settings.dtype, device))
        remote = settings.trust_remote_code
        with load_errors(folder, None, remote):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
            model = AutoModel.from_pretrained(
                str(folder), dtype=dtype, trust_remote_code=remote, use_safetensors=True
            )
        model.to(device).eval()
        return cls(model, tokenizer, spec, name, device)

    def _refuse_chat(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"{self.name} is an embedding model: it answers POST /v1/embeddings, not chat or "
            "completions; ask a chat model for replies",
            "model",
        )

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        raise self._refuse_chat()

    async def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        raise self._refuse_chat()

    def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None = None) -> Embedded:
        """Vectors for texts or token-id lists (this model's own ids, without special tokens)."""
        import torch

        if dimensions is not None and dimensions != self.spec.dimension:
            raise InvalidRequestError(
                f"{self.name} gives {self.spec.dimension}-dimensional vectors and was not trained to be "
                "shortened (Matryoshka): leave dimensions out",
                "dimensions",
            )
        rows = [self._ids(x, i) for i, x in enumerate(inputs)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        vectors: list[list[float]] = [[] for _ in rows]
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), BATCH):
                batch = order[start : start + BATCH]
                padded = self.tokenizer.pad({"input_ids": [rows[i] for i in batch]}, return_tensors="pt")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                hidden = self.model(**padded).last_hidden_state
                out = pool(hidden, padded["attention_mask"], self.spec.pooling).float()
                if self.spec.normalize:
                    out = torch.nn.functional.normalize(out, p=2, dim=1)
                for i, vector in zip(batch, out.cpu().tolist(), strict=True):
                    vectors[i] = vector
        return Embedded(vectors, sum(len(r) for r in rows))

    def _ids(self, text_or_ids: str | list[int], index: int) -> list[int]:
        """One input's token ids with the model's special tokens, truncated to the limit."""
        before, after = self._around
        room = self.context_length - len(before) - len(after)
        if isinstance(text_or_ids, str):
            ids = self.tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
        else:
            ids = text_or_ids
            vocab = len(self.tokenizer)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{index}] holds the token id {bad}, outside this model's vocabulary of {vocab}: "
                    "token ids are the model's own (send text instead)",
                    f"input.{index}",
                )
        return [*before, *ids[:room], *after]
