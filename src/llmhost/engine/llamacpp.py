"""The llama.cpp engine (`pip install llmhost[llamacpp]`): a GGUF file run by llama-cpp-python on
the CPU, with llama.cpp's quantized kernels and none of the conversion to float32.

It plugs into the same scheduler as the transformers engine: llama.cpp evaluates tokens and
hands back logits; llmhost's own sampling, stop strings, UTF-8-safe detokenization, queue and
cancellation run on top, so both engines behave alike for every front end. The binding decodes
one sequence at a time, so concurrent requests wait in the scheduler's queue (its length is in
/metrics as llmhost_queue_length).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmhost.config import LoadSettings
from llmhost.engine.context import Message
from llmhost.engine.scheduled import ScheduledEngine
from llmhost.errors import ChatTemplateError, LlmhostError

INSTALL = "pip install 'llmhost[llamacpp]' (builds llama-cpp-python from source, about 7 minutes on 2 cores)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class _Decoder:
    """llama.cpp's detokenizer with the `decode` signature the shared text code expects."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = self.llm.detokenize(list(ids), special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


class LlamaCppRunner:
    """One sequence at a time: prefill evaluates the prompt, each step one token."""

    max_batch = 1
    device = "cpu"

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def _logits(self) -> Any:
        """The last evaluated token's logits, read from the context (the binding no longer copies
        them into `scores` unless every position's logits are kept)."""
        import llama_cpp
        import numpy as np
        import torch

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.llm.n_vocab(),))
        return torch.from_numpy(row.copy())

    def prefill(self, req: Any) -> Any:
        self.llm.reset()
        self.llm.eval(req.prompt_ids)
        return self._logits()

    def commit_prefill(self) -> None:
        pass

    def step(self, reqs: list[Any]) -> Any:
        self.llm.eval([reqs[0].last_token])
        return self._logits().unsqueeze(0)

    def drop(self, keep: list[int]) -> None:
        if not keep:
            self.llm.reset()


class LlamaCppEngine(ScheduledEngine):
    kind = "llamacpp"

    def __init__(self, llm: Any, name: str, template: str, max_queue: int) -> None:
        self.llm = llm
        self.name = name
        self.context_length = llm.n_ctx()
        self.decoder = _Decoder(llm)
        self.chat_template = template
        self.max_queue = max_queue
        meta = llm.metadata
        eos = {llm.token_eos()}
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in meta:
                eos.add(int(meta[key]))
        self.eos_ids = eos
        self.bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        self.eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")

    @classmethod
    def load(cls, gguf: Path, settings: LoadSettings, name: str) -> LlamaCppEngine:
        if not available():
            raise LlmhostError(f"the llama.cpp engine is not installed: {INSTALL}")
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(gguf),
            n_ctx=settings.context_length or 0,  # 0: the model's own window
            n_threads=physical_cores(),
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template")
        if settings.chat_template is not None:
            try:
                template = Path(settings.chat_template).read_text(encoding="utf-8")
            except OSError as err:
                raise LlmhostError(
                    f"cannot read --chat-template {settings.chat_template}: {err.strerror}"
                ) from None
        return cls(llm, name, template, settings.max_queue)

    def render(self, messages: list[Message]) -> str:
        """The GGUF's template through transformers' sandboxed Jinja, as for the HF engine."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.chat_template:
            raise ChatTemplateError(
                f"the model {self.name} has no chat template: pass --chat-template FILE, "
                "or send a plain prompt"
            )
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                add_generation_prompt=True,
                bos_token=self.bos,
                eos_token=self.eos,
            )
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template refused these messages: {err}") from None
        return rendered[0]

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self.llm.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)

    def encode_text(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def runner(self) -> LlamaCppRunner:
        return LlamaCppRunner(self.llm)
