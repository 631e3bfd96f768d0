"""`llmhost merge NAME --out NAME2`: fold a LoRA adapter into its base and store the result as a
standalone model (safetensors, with the base's tokenizer and chat template)."""

from __future__ import annotations

import shutil

from llmhost.engine.ref import ModelRef
from llmhost.errors import InvalidRequestError
from llmhost.store.local import Store, StoredModel
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


def merge(adapter: ModelRef, out: str, overwrite: bool = False) -> StoredModel:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not adapter.is_adapter or adapter.base is None:
        raise InvalidRequestError(
            f"{adapter.name!r} is not a fine-tuned model in the store (`llmhost list` shows them)"
        )
    store = Store()
    check_name(out)
    if store.get(out) and not overwrite:
        raise InvalidRequestError(f"the store already has {out!r}: pick another --out, or pass --overwrite")
    base_path = adapter.base.hf_folder()
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    with store.write(out) as w:
        model.save_pretrained(str(w.staging), safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (base_path / file).exists() and not (w.staging / file).exists():
                shutil.copy2(base_path / file, w.staging / file)
        return w.commit("hf", "merge", extra={"adapter": adapter.name, "base": adapter.base.key})
