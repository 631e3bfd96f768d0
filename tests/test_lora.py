"""Per-row LoRA (engine/backends/lora.py) against peft itself: the same logits as peft's model
for each adapter, and rows of different adapters in one batch each as alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmhost.engine.backends.lora import RowLora
from llmhost.errors import LlmhostError
from llmhost.testing import build_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [
        build_adapter(root / "a", tiny_dir, 1),
        build_adapter(root / "b", tiny_dir, 2, rank=8, every_projection=True, scale=0.1),
    ]


def base_model(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


def test_each_adapter_gives_peft_s_logits_and_rows_mix_freely(tiny_dir: Path, adapters: list[Path]) -> None:
    from peft import PeftModel

    ids = torch.tensor([[5, 77, 910, 3000, 42, 17]])
    expected = []
    for path in adapters:
        peft_model = PeftModel.from_pretrained(base_model(tiny_dir), str(path)).eval()
        with torch.inference_mode():
            expected.append(peft_model(input_ids=ids).logits)
    model = base_model(tiny_dir)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
    lora = RowLora(model)
    for i, path in enumerate(adapters):
        lora.add(f"a{i}", path)
    with torch.inference_mode():
        for i in range(2):
            with lora.rows([f"a{i}"]):
                got = model(input_ids=ids).logits
            assert torch.allclose(got, expected[i], atol=1e-5), i
        with lora.rows([None]):
            assert torch.equal(model(input_ids=ids).logits, plain)
        batch = ids.repeat(3, 1)
        with lora.rows(["a1", None, "a0"]):
            mixed = model(input_ids=batch).logits
    assert torch.allclose(mixed[0], expected[1][0], atol=1e-5)
    assert torch.allclose(mixed[1], plain[0], atol=1e-5)
    assert torch.allclose(mixed[2], expected[0][0], atol=1e-5)
    lora.remove("a0")
    with torch.inference_mode(), lora.rows(["a1"]):
        assert torch.allclose(model(input_ids=ids).logits, expected[1], atol=1e-5)


def test_adapters_it_cannot_apply_per_row_say_to_merge(
    tiny_dir: Path, adapters: list[Path], tmp_path
) -> None:
    import json
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    lora = RowLora(base_model(tiny_dir))
    with pytest.raises(LlmhostError, match="llmhost merge"):
        lora.add("d", dora)
    with pytest.raises(LlmhostError, match="not a LoRA adapter"):
        lora.add("x", tmp_path)


def test_llamacpp_conversion_says_what_it_cannot_convert(
    tiny_dir: Path, adapters: list[Path], tmp_path: Path
) -> None:
    """The GGUF form of an adapter (for the llama.cpp engine): written for the architectures it
    knows, a one-line error naming the way out for the rest; nothing half-written is kept."""
    import json
    import shutil

    from gguf import GGUFReader

    from llmhost.engine.backends.gguf import GGUFReadError, lora_gguf

    out = lora_gguf(adapters[0], tmp_path / "cache", "llama", 4, 2)
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert lora_gguf(adapters[0], tmp_path / "cache", "llama", 4, 2) == out  # converted once
    with pytest.raises(GGUFReadError, match="--engine transformers"):
        lora_gguf(adapters[0], tmp_path / "cache", "gemma3", 4, 2)
    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(GGUFReadError, match="DoRA"):
        lora_gguf(dora, tmp_path / "cache", "llama", 4, 2)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p != out.parent]
    assert leftovers == []
