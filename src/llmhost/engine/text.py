"""Token ids to text, one token at a time: UTF-8 safe detokenization and stop-string hold-back.

Every engine that emits token ids uses these, so the rules live in one place:
never emit half a character, never emit any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes only a short window (the previous emitted token onwards), not the whole sequence,
    so the cost per token stays constant; holds text back while it ends in an incomplete UTF-8
    sequence (the decoder shows those as U+FFFD).
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window we decode for context
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left at the end; bytes of a character cut off by the end are dropped."""
        return self._advance(final=True).rstrip("\ufffd")

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window = self._ids[self._prefix :]
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(window)
        if len(text) <= len(prefix_text) and not final:
            return ""
        if text.endswith("\ufffd") and not final:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def piece(self, token_id: int) -> str:
        """One token's own text (special tokens shown), for logprobs."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


class StopMatcher:
    """Holds back text that may still become a stop string; cuts the reply before one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        #: The stop string that ended the reply (Anthropic's `stop_sequence` reports it).
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Returns the text that is safe to emit now; sets `stopped` when a stop string appears."""
        if not self._stops:
            return text
        self._pending += text
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = max((held_prefix_len(self._pending, s) for s in self._stops), default=0)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (text to hold back
    while it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
