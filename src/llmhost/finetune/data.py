"""Training data: format detection per line (chat / Alpaca / ShareGPT), a preflight pass that
reads every line before the model loads, and tokenization with loss on assistant tokens only."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmhost.engine.template import ChatTemplate
from llmhost.errors import ChatTemplateError, InvalidRequestError

REASONS = {
    "json": "invalid JSON",
    "format": "not chat, Alpaca or ShareGPT",
    "role": "unknown role",
    "empty": "empty content",
    "no_reply": "no assistant reply",
    "too_long": "too long after tokenization",
    "template": "the chat template cannot mark the replies",
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
IGNORE = -100  # label of tokens that carry no loss


class DataProblem(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    line: int
    messages: list[dict[str, str]]
    format: str


@dataclass(frozen=True)
class Problem:
    line: int
    reason: str
    detail: str


@dataclass
class Preflight:
    path: Path
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(p.reason for p in self.problems)

    def report(self, limit: int = 5) -> list[str]:
        """One line per reason: count, lines, and the first details."""
        out = []
        for reason, n in self.counts().most_common():
            hits = [p for p in self.problems if p.reason == reason]
            lines = ", ".join(str(p.line) for p in hits[:limit]) + (", …" if n > limit else "")
            out.append(f"{n} × {REASONS[reason]} (line {lines}): {hits[0].detail}")
        return out

    def check(self, strict: bool) -> None:
        if strict and self.problems:
            first = self.problems[0]
            raise InvalidRequestError(
                f"{self.path}:{first.line}: {REASONS[first.reason]}: {first.detail} "
                f"({len(self.problems)} problem line(s) in all; without --strict they are skipped)"
            )
        if not self.examples:
            why = "; ".join(self.report()) or "the file has no lines"
            raise InvalidRequestError(f"{self.path} has no usable example: {why}")


def to_messages(obj: Any) -> tuple[list[dict[str, str]], str]:
    """One JSON object → (messages, format name), or DataProblem."""
    if not isinstance(obj, dict):
        raise DataProblem("format", "each line must be a JSON object")
    if "messages" in obj:
        raw, fmt = obj["messages"], "chat"
        messages = [
            _message(m.get("role") if isinstance(m, dict) else None, m, "content") for m in _list(raw)
        ]
    elif "conversations" in obj:
        fmt = "sharegpt"
        messages = []
        for turn in _list(obj["conversations"]):
            who = turn.get("from") if isinstance(turn, dict) else None
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise DataProblem("role", f"unknown ShareGPT speaker {who!r} (use human, gpt or system)")
            messages.append(_message(role, turn, "value"))
    elif "instruction" in obj and "output" in obj:
        fmt = "alpaca"
        prompt = str(obj.get("instruction") or "").strip()
        extra = str(obj.get("input") or "").strip()
        messages = [{"role": "system", "content": str(obj["system"])}] if obj.get("system") else []
        messages += [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
            {"role": "assistant", "content": str(obj.get("output") or "")},
        ]
        for m in messages:
            if not m["content"].strip():
                raise DataProblem("empty", f"empty {'instruction' if m['role'] == 'user' else 'output'}")
    else:
        raise DataProblem(
            "format", f"keys {sorted(obj)[:6]}: expected messages, conversations, or instruction+output"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataProblem("no_reply", "there is no assistant message to learn from")
    return messages, fmt


def _list(raw: Any) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise DataProblem("format", "the conversation must be a non-empty list")
    return raw


def _message(role: Any, m: Any, key: str) -> dict[str, str]:
    if role not in ("system", "user", "assistant"):
        raise DataProblem("role", f"unknown role {role!r} (use system, user or assistant)")
    content = m.get(key) if isinstance(m, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise DataProblem("empty", f"a {role} message has empty content")
    return {"role": role, "content": content}


def read_jsonl(path: Path) -> Preflight:
    """Read every line; good lines become examples, bad ones problems with their line numbers."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidRequestError(f"cannot read {path}: {err}") from None
    result = Preflight(Path(path))
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            result.problems.append(Problem(number, "json", str(err)))
            continue
        try:
            messages, fmt = to_messages(obj)
        except DataProblem as err:
            result.problems.append(Problem(number, err.reason, str(err)))
            continue
        result.examples.append(Example(number, messages, fmt))
    return result


@dataclass(frozen=True)
class Tokenized:
    line: int
    input_ids: list[int]
    labels: list[int]


def tokenize(pre: Preflight, tokenizer: Any, max_length: int) -> list[Tokenized]:
    """Render each example with the model's own chat template; only reply tokens carry loss.
    Examples longer than `max_length` become `too_long` problems (never silently cut)."""
    out = []
    template = training_template(tokenizer)
    for ex in pre.examples:
        try:
            item = encode(tokenizer, ex.messages, template)
        except DataProblem as err:
            pre.problems.append(Problem(ex.line, err.reason, str(err)))
            continue
        if len(item[0]) > max_length:
            pre.problems.append(
                Problem(ex.line, "too_long", f"{len(item[0])} tokens > --max-length {max_length}")
            )
            continue
        out.append(Tokenized(ex.line, *item))
    pre.examples = [ex for ex in pre.examples if any(t.line == ex.line for t in out)]
    return out


def training_template(tokenizer: Any) -> ChatTemplate:
    from llmhost.engine.backends.transformers import chat_template_of

    return chat_template_of(tokenizer, "the base model")


def encode(
    tokenizer: Any, messages: list[dict[str, str]], template: ChatTemplate | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels: each reply's span is found by rendering the conversation up to it.
    Rendered as the server renders a chat (sandboxed, time-bounded), and control-token text in
    the data is trained as text, exactly as it would be read at inference."""
    template = template or training_template(tokenizer)
    marker = template.marker()

    def render(upto: list[dict[str, str]], reply_next: bool) -> str:
        try:
            return template.render(upto, marker, add_generation_prompt=reply_next) if upto else ""
        except ChatTemplateError as err:
            raise DataProblem("template", str(err)) from None

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataProblem(
                "template", "rendering the conversation turn by turn does not give a prefix of it"
            )
        spans.append((len(before), len(through)))
    ids: list[int] = []
    starts: list[int] = []
    for at, text, markup in marker.split(full):
        enc = tokenizer(
            text, add_special_tokens=False, split_special_tokens=not markup, return_offsets_mapping=True
        )
        ids += enc["input_ids"]
        starts += [at + start for start, _ in enc["offset_mapping"]]
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE
        for tok, start in zip(ids, starts, strict=True)
    ]
    if all(label == IGNORE for label in labels):
        raise DataProblem("template", "no reply token was found in the rendered conversation")
    return ids, labels
