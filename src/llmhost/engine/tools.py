"""Tool calling for every engine that samples tokens: the prompt side (messages in the shape
chat templates expect, or a fallback for templates without tools) and the reply side (one
streaming parser that turns the model's call markup into `ToolCall`s).

Formats read, whatever the model family (a reply is parsed by what follows each tag):
- Hermes, `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Qwen2.5, Qwen3, QwQ, and the
  fallback), also with a list of calls inside one tag (SmolLM2);
- Qwen3-Coder / Qwen3.5 XML, `<tool_call><function=NAME><parameter=P>value</parameter>…`.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from typing import Any

from llmhost.engine.chunks import ToolCall
from llmhost.engine.context import Message
from llmhost.engine.text import held_prefix_len

OPEN, CLOSE = "<tool_call>", "</tool_call>"

#: What a template without tool support gets in its system turn (the documented fallback).
FALLBACK_PROMPT = """You can call functions. Their signatures, as JSON schemas, one per line:
<tools>
{tools}
</tools>
To call a function, reply with only this, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Results come back in <tool_response> blocks."""


def uses_tools(template_source: str | None) -> bool:
    """Whether a chat template renders `tools` itself (else the fallback describes them)."""
    return bool(template_source) and re.search(r"\btools\b", template_source or "") is not None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def template_messages(
    messages: list[Message], tools: list[dict[str, Any]] | None, native: bool
) -> list[Message]:
    """Messages as transformers' `apply_chat_template` expects them: a call's arguments as an
    object, not JSON text. Without `native` template support, calls, results and the tool list
    become text the model can read (the fallback)."""
    out: list[Message] = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls") or []
        if calls:
            m["tool_calls"] = [_call_for_template(c) for c in calls]
        if not native:
            if calls:
                blocks = [_call_text(c["function"]) for c in m.pop("tool_calls")]
                m["content"] = "\n".join(filter(None, [m.get("content") or "", *blocks]))
            if m["role"] == "tool":
                m = {
                    "role": "user",
                    "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>",
                }
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools and not native:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        text = FALLBACK_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _call_text(function: dict[str, Any]) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # else a template prints it as it came
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "type": "function", "function": function}


class ToolCallParser:
    """Streaming: `push(text)` returns the content safe to show and the calls completed so far.

    Text that may still become `<tool_call>` is held back, and everything from the tag to its
    closing tag is never content: a call arrives whole or not at all. A block that does not
    parse as a call is returned as content when it closes (the model wrote text, not a call).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self._space = ""
        self.calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._inside:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = held_prefix_len(self._buffer, OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                # the whitespace before a call is markup, not content
                content = [(self._space + "".join(content) + self._buffer[:at]).rstrip()]
                self._buffer, self._inside, self._space = self._buffer[at + len(OPEN) :], True, ""
            at = self._buffer.find(CLOSE)
            if at < 0:
                break
            block, self._buffer, self._inside = self._buffer[:at], self._buffer[at + len(CLOSE) :], False
            found = parse_block(block)
            if found is None:
                content.append(OPEN + block + CLOSE)
            calls += found or []
        self.calls += len(calls)
        return self._hold_space("".join(content)), calls

    def _hold_space(self, text: str) -> str:
        """Trailing whitespace waits for what follows: text keeps it, a call drops it."""
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        return body

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The end of the reply: a call whose closing tag never came still counts if it parses
        (models often end with EOS right after the JSON)."""
        rest, self._buffer = self._buffer, ""
        if not self._inside:
            return ("" if self.calls else self._space) + rest, []
        self._inside = False
        found = parse_block(rest)
        if found is None:
            return OPEN + rest, []
        self.calls += len(found)
        return "", found


def parse_block(block: str) -> list[ToolCall] | None:
    """The calls in the text between `<tool_call>` and `</tool_call>`, or None if it holds none."""
    block = block.strip()
    if block.startswith("<function="):
        return _parse_xml(block)
    try:
        value = json.loads(block)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.S)


def _parse_xml(block: str) -> list[ToolCall] | None:
    calls = []
    for name, body in _FUNCTION.findall(block):
        arguments: dict[str, Any] = {}
        for key, raw in _PARAMETER.findall(body):
            try:  # numbers, booleans, objects and lists are written as JSON; text as it is
                arguments[key.strip()] = json.loads(raw)
            except ValueError:
                arguments[key.strip()] = raw
        calls.append(ToolCall(new_call_id(), name.strip(), json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def call_schema(tools: list[dict[str, Any]], only: str | None) -> dict[str, Any]:
    """The JSON schema of one call `{"name": …, "arguments": {…}}` to any of `tools` (or `only`)."""
    options = []
    for tool in tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}
