"""What a model's raw reply text means: reasoning (`<think>…</think>`), the answer, and tool calls
in the answer. One streaming parser per request, for every engine that samples tokens; tags are
held back while incomplete, so no tag text ever reaches the answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmhost.engine.chunks import ToolCall
from llmhost.engine.text import held_prefix_len
from llmhost.engine.tools import ToolCallParser

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(slots=True)
class Parsed:
    answer: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ThinkSplitter:
    """Splits `<think>` reasoning from the answer. `inside` is true when the prompt already
    opened the block (DeepSeek-R1 distills' templates end with `<think>`)."""

    def __init__(self, inside: bool = False) -> None:
        self.inside = inside
        self.done = False  # the reasoning block closed: the rest is the answer
        self._buffer = ""
        self._trim = inside  # strip the newlines that follow a tag

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) safe to emit."""
        self._buffer += text
        reasoning, answer = [], []
        while self._buffer:
            if self.done:
                answer.append(self._lstrip(self._buffer))
                self._buffer = ""
            elif not self.inside:  # nothing but whitespace so far: thinking may still begin
                stripped = self._buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buffer, self.inside, self._trim = stripped[len(THINK_OPEN) :], True, True
                    continue
                if THINK_OPEN.startswith(stripped):
                    break
                self.done = True  # the answer began without thinking
            else:
                at = self._buffer.find(THINK_CLOSE)
                if at < 0:
                    keep = held_prefix_len(self._buffer, THINK_CLOSE)
                    reasoning.append(self._lstrip(self._buffer[: len(self._buffer) - keep]))
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                reasoning.append(self._lstrip(self._buffer[:at]))
                self._buffer = self._buffer[at + len(THINK_CLOSE) :]
                self.inside, self.done, self._trim = False, True, True
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self.inside else ("", rest)

    def _lstrip(self, text: str) -> str:
        if self._trim:
            stripped = text.lstrip("\n")
            if stripped:
                self._trim = False
            return stripped
        return text


class ReplyParser:
    """Raw text in; answer, reasoning and calls out. With neither thinking nor tools it passes
    text straight through."""

    def __init__(
        self, thinks: bool = False, opened: bool = False, tools: bool = False, one_call: bool = False
    ) -> None:
        self._think = ThinkSplitter(opened) if thinks else None
        self._tools = ToolCallParser() if tools else None
        self._one_call = one_call  # parallel_tool_calls false: the first call only
        self._kept = 0

    @property
    def answering(self) -> bool:
        """Whether the reply has reached its answer (a grammar applies from here on)."""
        return self._think is None or self._think.done

    @property
    def made_calls(self) -> bool:
        return self._tools is not None and self._tools.calls > 0

    def push(self, text: str) -> Parsed:
        if self._think is None:
            return self._answer(text, final=False)
        reasoning, answer = self._think.push(text)
        parsed = self._answer(answer, final=False)
        parsed.reasoning = reasoning
        return parsed

    def flush(self) -> Parsed:
        reasoning = answer = ""
        if self._think is not None:
            reasoning, answer = self._think.flush()
        parsed = self._answer(answer, final=True)
        parsed.reasoning = reasoning
        return parsed

    def _answer(self, text: str, final: bool) -> Parsed:
        if self._tools is None:
            return Parsed(answer=text)
        answer, calls = self._tools.push(text)
        if final:
            rest, more = self._tools.flush()
            answer, calls = answer + rest, calls + more
        if self._one_call:
            calls = calls[: max(0, 1 - self._kept)]
        self._kept += len(calls)
        return Parsed(answer=answer, calls=calls)
