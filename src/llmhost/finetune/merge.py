"""`llmhost merge NAME --out NAME2`: fold a LoRA adapter into its base and store the result as a
standalone model (safetensors, with the base's tokenizer and chat template)."""

from __future__ import annotations

import shutil
import time

from llmhost.errors import InvalidRequestError
from llmhost.store.local import Store, StoredModel, describe_files
from llmhost.store.names import check_name

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def merge(name: str, out: str, overwrite: bool = False) -> StoredModel:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmhost.engine.loader import resolve, stored_adapter

    adapter = stored_adapter(name)
    if adapter is None:
        raise InvalidRequestError(
            f"{name!r} is not a fine-tuned model in the store (`llmhost list` shows them)"
        )
    store = Store()
    check_name(out)
    if store.get(out) and not overwrite:
        raise InvalidRequestError(f"the store already has {out!r}: pick another --out, or pass --overwrite")
    base = adapter.extra.get("base", "default")
    base_path, _ = resolve(None if base == "default" else base)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter.folder)).merge_and_unload()
    with store.lock(out):
        staging = store.staging(out)
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (base_path / file).exists() and not (staging / file).exists():
                shutil.copy2(base_path / file, staging / file)
        result = StoredModel(
            name=out, folder=staging, format="hf", source="merge", files=describe_files(staging),
            created=time.time(), extra={"adapter": name, "base": base},
        )  # fmt: skip
        return store.commit(result, staging)
