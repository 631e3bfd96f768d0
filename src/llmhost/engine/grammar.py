"""Grammar-constrained decoding with llguidance: a JSON schema (`response_format`) or a forced tool
call (`tool_choice` required or named) becomes a token mask applied before sampling, so the reply
always parses and validates.

Why llguidance (measured on this 2-core CPU, SmolLM2's 49k vocabulary, a nested schema,
`bench/structured.py` has the end-to-end numbers): a mask costs about 70 µs per token at batch 1
and 15 µs per row at batch 8, 1% of a decode step; xgrammar's masks are faster still (9 and 5 µs)
but it pulls in triton and apache-tvm-ffi, while llguidance is one self-contained wheel, reads a
llama.cpp vocabulary directly, and takes Lark grammars with embedded JSON schemas (the tool-call
tags and the arguments' schema in one grammar).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llmhost.engine.params import GenerationParams
from llmhost.engine.tools import CLOSE, OPEN, call_schema
from llmhost.errors import InvalidRequestError, LlmhostError

INSTALL = "pip install llguidance"
# how constrained JSON is written: as json.dumps writes it, no free whitespace for a model to
# wander in
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(params: GenerationParams) -> tuple[str, str] | None:
    """The Lark grammar a request's reply must follow, and the parameter it came from; None when
    the reply is free."""
    if params.forces_tool:
        schema = call_schema(params.tools, params.tool_name)
        call = f"call: {json.dumps(OPEN + chr(10))} args {json.dumps(chr(10) + CLOSE)}"
        start = (
            'start: call ("\\n" call)*'
            if params.parallel_tool_calls is True and not params.tool_name
            else "start: call"
        )
        return f"{start}\n{call}\nargs: %json {json.dumps(_styled(schema))}", "tools"
    if params.json_schema is not None:
        return f"start: value\nvalue: %json {json.dumps(_styled(params.json_schema))}", "response_format"
    return None


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**_JSON_STYLE, **(schema.get("x-guidance") or {})}}


class Grammars:
    """One model's vocabulary as llguidance sees it; compiles and checks grammars for requests."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def processor(self, params: GenerationParams, answering: Callable[[], bool]) -> GrammarProcessor | None:
        """A logits processor for the request, or None; a bad schema is a 400 before decoding."""
        found = grammar_for(params)
        if found is None:
            return None
        llguidance = load_llguidance()
        grammar, param = found
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            what = "a tool's parameters schema" if param == "tools" else "the JSON schema"
            raise InvalidRequestError(f"{what} cannot be used: {_reason(messages[0])}", param=param)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the schema cannot be used: {matcher.get_error()}", param=param)
        return GrammarProcessor(matcher, answering)


def load_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise LlmhostError(f"structured outputs and forced tool calls need llguidance: {INSTALL}") from None
    return llguidance


class GrammarProcessor:
    """A logits processor (mlx-lm's shape: generated ids and logits in, logits out): feeds the
    matcher the tokens sampled since the last call and masks every token the grammar forbids.
    It starts when the reply reaches its answer, so a thinking model thinks freely first."""

    def __init__(self, matcher: Any, answering: Callable[[], bool]) -> None:
        self.matcher = matcher
        self.answering = answering
        self._fed: int | None = None  # tokens fed to the matcher so far; None until the answer

    def __call__(self, generated: list[int], logits: Any) -> Any:
        import numpy as np
        import torch

        if self._fed is None:
            if not self.answering():
                return logits
            self._fed = len(generated)  # the reasoning before this is not the grammar's
        for token in generated[self._fed :]:
            self.matcher.consume_token(token)
        self._fed = len(generated)
        if self.matcher.is_error():
            raise LlmhostError(f"constrained decoding failed: {self.matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: logits.shape[-1]].astype(bool))
        if allowed.shape[0] < logits.shape[-1]:  # a model's padded vocabulary: never those ids
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.masked_fill(~allowed, float("-inf"))


def _reason(error: str) -> str:
    """llguidance's error without the grammar llmhost wrote around the schema: one line."""
    first = error.splitlines()[0] if error else "invalid"
    return first.split("failed to compile JSON schema: ", 1)[-1]
