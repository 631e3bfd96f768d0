"""The llama.cpp engine: a GGUF file opened by llama-cpp-python (model, tokenizer, metadata,
chat template), its slots sized, decoding handed to `LlamaCppRunner`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmhost.config import KV_ELEMENT_BYTES, LoadSettings
from llmhost.engine.backends.gguf import GGUFReadError
from llmhost.engine.backends.llamacpp.offload import DEFAULT_SLOT_TOKENS, GgufFacts, open_offloaded
from llmhost.engine.backends.llamacpp.runner import LlamaCppRunner
from llmhost.engine.backends.llamacpp.slots import PREFILL_BLOCK
from llmhost.engine.base import Engine
from llmhost.engine.local import LocalEngine
from llmhost.engine.ref import ModelRef
from llmhost.engine.template import ChatTemplate, control_tokens
from llmhost.errors import InvalidRequestError, LlmhostError
from llmhost.hardware import physical_cores

log = logging.getLogger("llmhost.llamacpp")

INSTALL = "pip install 'llmhost[llamacpp]' (builds llama-cpp-python from source, about 7 minutes on 2 cores)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class _Decoder:
    """llama.cpp's detokenizer with the `decode` signature the shared text code expects."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = self.llm.detokenize(list(ids), special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


def kv_bytes_per_token(llm: Any, cache: str = "f16") -> int:
    """Keys and values of every layer, for one token, in the cache type `cache`."""
    import llama_cpp

    model = llm.model
    head_dim = llama_cpp.llama_model_n_embd(model) // max(1, llama_cpp.llama_model_n_head(model))
    values = llama_cpp.llama_model_n_layer(model) * 2 * llama_cpp.llama_model_n_head_kv(model) * head_dim
    return int(values * KV_ELEMENT_BYTES[cache])


def slot_tokens(
    llm: Any, window: int, explicit: bool, kv_gib: float | None, slots: int, cache: str = "f16"
) -> int:
    """Tokens each slot's KV stream holds (the most one request may span): the model's window up
    to DEFAULT_SLOT_TOKENS (all of it when --context-length asks); with `kv_gib`, what that buys
    divided among the slots, at most the window."""
    if kv_gib is None:
        return window if explicit else min(window, DEFAULT_SLOT_TOKENS)
    per_slot = min(window, int(kv_gib * 2**30 // kv_bytes_per_token(llm, cache)) // slots)
    if per_slot < 4 * PREFILL_BLOCK:
        raise LlmhostError(
            f"--kv-cache-gib {kv_gib:g} gives each of the {slots} slots (--max-concurrency) only "
            f"{per_slot} tokens: raise --kv-cache-gib or lower --max-concurrency"
        )
    return per_slot


def _controls(llm: Any, template: str | None) -> list[str]:
    """The vocabulary's control tokens, and its user-defined ones that the template writes."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    special, added = [], []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
            text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
            (special if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL else added).append(text)
    return control_tokens(special, added, template)


def load(ref: ModelRef, settings: LoadSettings) -> Engine:
    """The GGUF file itself, read by llama.cpp (no conversion); one with a pooling type embeds,
    one with rank pooling reranks."""
    from llmhost.engine.backends.llamacpp.embedding import LlamaCppEmbeddingEngine
    from llmhost.engine.backends.llamacpp.offload import read_facts
    from llmhost.engine.backends.llamacpp.rerank import LlamaCppRerankEngine

    try:
        gguf = ref.gguf_file()
        facts = read_facts(gguf)
        if not available():
            raise LlmhostError(f"the llama.cpp engine is not installed: {INSTALL}")
        if (pooling := facts.pooling) is not None:
            if pooling[0] == "rank":
                return LlamaCppRerankEngine.load(gguf, settings, ref.name, facts, pooling[1])
            return LlamaCppEmbeddingEngine.load(gguf, settings, ref.name, facts, *pooling)
        return LlamaCppEngine.load(gguf, settings, ref.name, facts)
    except GGUFReadError as err:
        raise ref.damaged(ref.path, str(err), "GGUF model") from None


class LlamaCppEngine(LocalEngine):
    kind = "llamacpp"
    serves_adapters = True

    def __init__(self, llm: Any, name: str, template: str | None, settings: LoadSettings) -> None:
        import llama_cpp

        self.llm = llm
        self.name = name
        window = settings.context_length or llama_cpp.llama_model_n_ctx_train(llm.model)
        self.max_batch = settings.max_concurrency
        #: The KV cache's element type (--kv-cache): f16, or a quantized q8_0 / q4_0
        self.kv_cache = settings.kv_cache
        self.speculative = settings.speculation
        #: The draft model's llama.cpp object (`--draft-model`), its vocabulary checked; None without one.
        self.draft_llm: Any = None
        self.draft_name = ""
        #: Each slot's KV stream, and so the most one request may span.
        self.context_length = slot_tokens(
            llm,
            window,
            settings.context_length is not None,
            settings.kv_cache_gib,
            self.max_batch,
            self.kv_cache,
        )
        log.info(
            "llama.cpp: %d slots (--max-concurrency) of %d tokens each (the model's window is %d), a %s KV "
            "cache of %.2f GiB (--kv-cache, --kv-cache-gib, --context-length)",
            self.max_batch,
            self.context_length,
            window,
            self.kv_cache,
            self.max_batch * self.context_length * kv_bytes_per_token(llm, self.kv_cache) / 2**30,
        )
        self.decoder = _Decoder(llm)
        self.max_queue = settings.max_queue
        self.exact = settings.exact_prefix
        #: Whether the exact prefix cache tries ggml's reference kernels (`LlamaCppRunner`); off, it
        #: gets the scheme K-quants get
        self.reference_kernels = settings.reference_kernels
        meta = llm.metadata
        eos = {llm.token_eos()}
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in meta:
                eos.add(int(meta[key]))
        self.eos_ids = eos
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        self.template = ChatTemplate(
            template, name, {"bos_token": bos, "eos_token": eos}, _controls(llm, template)
        )

    @classmethod
    def load(cls, gguf: Path, settings: LoadSettings, name: str, facts: GgufFacts) -> LlamaCppEngine:
        # this object reads the model, its tokenizer and metadata; decoding happens in the
        # runner's own multi-sequence context, so its own context is kept minimal
        llm, device = open_offloaded(gguf, settings, facts)
        template = settings.read_chat_template() or llm.metadata.get("tokenizer.chat_template")
        engine = cls(llm, name, template, settings)
        engine.placement = device
        if settings.draft_model:
            engine.draft_llm, engine.draft_name = _open_draft(settings, llm, name)
        _ = engine.scheduler  # the KV cache now: not enough memory is a load error, not a request's
        return engine

    def encode_markup(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def encode_text(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def grammar_tokenizer(self) -> Any:
        from llmhost.engine.grammar import load_llguidance

        load_llguidance()
        import llama_cpp
        import llguidance.llamacpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        with warnings.catch_warnings():
            # llguidance reads each token's kind through a call llama-cpp-python marks deprecated:
            # one warning per vocabulary entry (49k here), none of which the user can act on
            warnings.simplefilter("ignore", DeprecationWarning)
            return llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=sorted(self.eos_ids))

    def runner(self) -> LlamaCppRunner:
        from llmhost.engine.backends.llamacpp.draft import DraftModel

        cores = physical_cores()
        draft = self.draft_llm and DraftModel(self.draft_llm, self.max_batch, self.context_length, cores)
        return LlamaCppRunner(
            self.llm,
            self.context_length,
            self.max_batch,
            cores,
            self.exact,
            self.reference_kernels,
            self.kv_cache,
            draft,
        )

    @property
    def has_draft_model(self) -> bool:  # type: ignore[override]
        return self.draft_llm is not None

    def facts(self) -> dict[str, str]:
        facts = super().facts()
        if self.draft_llm is not None:
            facts["draft_model"] = self.draft_name
        return facts


def _open_draft(settings: LoadSettings, target: Any, target_name: str) -> tuple[Any, str]:
    """The --draft-model's llama.cpp object, refused unless its vocabulary is the target's."""
    from llmhost.engine.backends.llamacpp.draft import check_vocabulary
    from llmhost.engine.backends.llamacpp.offload import read_facts
    from llmhost.engine.ref import resolve_ref

    assert settings.draft_model is not None
    ref = resolve_ref(settings.draft_model)
    if not ref.is_gguf:
        raise InvalidRequestError(
            f"--draft-model {settings.draft_model} is not a GGUF model (llama.cpp reads GGUF)"
        )
    gguf = ref.gguf_file()
    try:  # a damaged draft is the draft's to mend, not the target's (load words the target's)
        facts = read_facts(gguf)
        if facts.pooling is not None:
            raise InvalidRequestError(
                f"--draft-model {settings.draft_model} is an embedding model or a reranker, not a chat model"
            )
        llm, _ = open_offloaded(gguf, settings, facts)
    except GGUFReadError as err:
        raise ref.damaged(gguf, str(err), "GGUF draft model (--draft-model)") from None
    check_vocabulary(target, llm, target_name, ref.name)
    log.info("llama.cpp: draft model %s for --speculative draft", ref.name)
    return llm, ref.name
