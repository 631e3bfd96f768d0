"""Options of `llmhost pull`; its flags derive from these fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["modelscope", "hf"] | None = Field(
        None,
        description="Hub to download from: modelscope (the default for catalog models that are on it) "
        "or hf (Hugging Face; the default for other repository ids).",
    )
    revision: str | None = Field(None, description="Branch, tag or commit to pull (default: the catalog's).")
    endpoint: str | None = Field(None, description="Hub URL, e.g. a private mirror of the Hugging Face hub.")
    mirror: bool = Field(False, description="Use the well-known Hugging Face mirror (https://hf-mirror.com).")
    include: list[str] = Field(
        default_factory=list,
        description="Only files matching this pattern (repeatable), e.g. '*q4_k_m.gguf'.",
    )
    quant: str | None = Field(
        None, description="A catalog model's GGUF quantization instead of its full weights, e.g. q4_k_m."
    )
    name: str | None = Field(None, description="Store the model under this name.")
    token: str | None = Field(
        None, description="Access token (default: HF_TOKEN or MODELSCOPE_API_TOKEN from the environment)."
    )
