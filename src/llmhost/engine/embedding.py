"""Embedding models: what a sentence-transformers folder says about itself (pooling, normalising,
the longest input, its prompts), read from its files and never guessed from its name, and the
engine that runs it on transformers.

A folder is an embedding model when its `modules.json` lists a Pooling module; the Transformer
module's `sentence_bert_config.json` gives `max_seq_length`, the Pooling module's `config.json`
the pooling mode, a Normalize module unit-length vectors, and `config_sentence_transformers.json`
the prompts put before texts (Qwen3-Embedding's query instruction, e5's `query: `). Inputs
longer than `max_seq_length` are truncated, as sentence-transformers does (the vector then
describes the first `max_seq_length` tokens; `usage.prompt_tokens` counts what was read).
Shortened vectors (`dimensions`) only for models the catalog says were trained for it
(Matryoshka), renormalised when the model normalises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmhost.config import LoadSettings
from llmhost.engine.chunks import Embedded
from llmhost.engine.encoder import EncoderEngine, Row, fitted, last_index
from llmhost.engine.request import EmbedRequest
from llmhost.errors import InvalidRequestError, LlmhostError

Pooling = Literal["cls", "mean", "max", "lasttoken"]
#: sentence-transformers' Pooling config keys → the modes llmhost runs.
POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class EmbeddingSpec:
    pooling: Pooling
    normalize: bool
    dimension: int
    max_seq_length: int | None
    #: Prompt name → the text put before an input (sentence-transformers' `prompts`).
    prompts: dict[str, str] = field(default_factory=dict)
    #: The prompt used where a request names none.
    default_prompt: str | None = None
    #: The fewest dimensions a shortened vector may keep; None: the model was not trained for it.
    matryoshka: int | None = None


def read_spec(folder: Path, matryoshka: int | None = None) -> EmbeddingSpec | None:
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
    st = _json(folder / "config_sentence_transformers.json")
    prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
    default = st.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise LlmhostError(f"{folder}: default_prompt_name {default!r} is not one of its prompts")
    return EmbeddingSpec(
        pooling=modes[0],
        normalize="Normalize" in kinds,
        dimension=int(config["word_embedding_dimension"]),
        max_seq_length=settings.get("max_seq_length"),
        prompts=prompts,
        default_prompt=default,
        matryoshka=matryoshka,
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
    if mode == "lasttoken":
        return hidden[torch.arange(hidden.shape[0]), last_index(mask)]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingEngine(EncoderEngine):
    """An embedding model on transformers; concurrent requests share forward passes."""

    task = "embed"

    def __init__(self, model: Any, tokenizer: Any, spec: EmbeddingSpec, name: str, device: str) -> None:
        super().__init__(
            model, tokenizer, name, device, spec.max_seq_length or int(tokenizer.model_max_length)
        )
        self.spec = spec
        # the special tokens the tokenizer puts around a text ([CLS] … [SEP], <s> … </s>, an
        # EOS for last-token pooling), found once from a sample: token-id inputs get the same,
        # and truncation keeps room for them
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self._around = (full[:at], full[at + len(bare) :])

    @classmethod
    def load(cls, folder: Path, spec: EmbeddingSpec, settings: LoadSettings, name: str) -> EmbeddingEngine:
        from transformers import AutoModel

        tokenizer, model, device = cls.load_parts(folder, settings, AutoModel)
        return cls(model, tokenizer, spec, name, device)

    def embed(self, request: EmbedRequest) -> Embedded:
        """Vectors for texts or token-id lists (this model's own ids, without special tokens)."""
        check = self._checked(request)
        return self._result(request, self._submit(lambda: self._rows(request, check)))

    async def aembed(self, request: EmbedRequest) -> Embedded:
        check = self._checked(request)
        return self._result(request, await self._asubmit(lambda: self._rows(request, check)))

    def _checked(self, request: EmbedRequest) -> str:
        """The prompt text for the request, after checking what it asks of this model."""
        spec, dims = self.spec, request.dimensions
        if dims is not None and dims != spec.dimension:
            if spec.matryoshka is None:
                raise InvalidRequestError(
                    f"{self.name} gives {spec.dimension}-dimensional vectors and was not trained to be "
                    "shortened (Matryoshka): leave dimensions out",
                    "dimensions",
                )
            if not spec.matryoshka <= dims <= spec.dimension:
                raise InvalidRequestError(
                    f"dimensions must be from {spec.matryoshka} to {spec.dimension} for {self.name}",
                    "dimensions",
                )
        name = request.prompt or spec.default_prompt
        if name is None:
            return ""
        if name not in spec.prompts:
            if request.prompt_optional:
                return spec.prompts.get(spec.default_prompt or "", "")
            have = ", ".join(sorted(spec.prompts)) or "none"
            raise InvalidRequestError(
                f"{self.name} has no prompt {name!r} (its prompts: {have})", "prompt_name"
            )
        return spec.prompts[name]

    def _rows(self, request: EmbedRequest, prompt: str) -> list[Row]:
        """Each input's token ids with the prompt and the model's special tokens, truncated to
        the limit (run on the batcher's thread)."""
        before, after = self._around
        room = self.context_length - len(before) - len(after)
        inputs = request.inputs
        if isinstance(inputs[0], str):
            texts = [prompt + text for text in inputs]  # type: ignore[operator]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            vocab = len(self.tokenizer)
            for index, row in enumerate(inputs):
                bad = next((t for t in row if not 0 <= t < vocab), None)  # type: ignore[union-attr]
                if bad is not None:
                    raise InvalidRequestError(
                        f"input[{index}] holds the token id {bad}, outside this model's vocabulary of "
                        f"{vocab}: token ids are the model's own (send text instead)",
                        f"input.{index}",
                    )
            ids = [[*head, *row] for row in inputs]  # type: ignore[misc]
        cut = request.truncate
        return [
            {"input_ids": [*before, *fitted(row, room, cut, i, self.name), *after]}
            for i, row in enumerate(ids)
        ]

    def _forward(self, batch: dict[str, Any]) -> list[Any]:
        import torch

        hidden = self.model(**batch).last_hidden_state
        out = pool(hidden, batch["attention_mask"], self.spec.pooling).float()
        if self.spec.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return list(zip(out.cpu().tolist(), lengths, strict=True))

    def _result(self, request: EmbedRequest, outputs: list[tuple[list[float], int]]) -> Embedded:
        dims = request.dimensions
        vectors = [vector for vector, _ in outputs]
        if dims is not None and dims < self.spec.dimension:
            vectors = [_shorten(v, dims, self.spec.normalize) for v in vectors]
        return Embedded(vectors, sum(n for _, n in outputs))


def _shorten(vector: list[float], dims: int, normalize: bool) -> list[float]:
    kept = vector[:dims]
    if not normalize:
        return kept
    norm = sum(x * x for x in kept) ** 0.5 or 1.0
    return [x / norm for x in kept]
