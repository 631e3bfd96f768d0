"""Finished requests' KV tensors kept for reuse by the transformers engine: the next request that
starts with the same tokens (a conversation's next turn, a shared system prompt, a retry)
copies the shared part and prefills only the rest. Least recently used entries go first when
the bytes kept pass the bound.

Only whole blocks are shared: the engine evaluates every prompt in blocks of `block` positions
from position 0, so a block's keys and values are the very numbers a cold run computes for it
(float kernels give different last bits for different batch shapes; whole blocks have the same
shapes).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Entry:
    tokens: list[int]
    """The tokens whose keys and values `layers` hold, from position 0."""
    layers: list[tuple[Any, Any]]
    """Per layer, keys and values shaped [1, heads, len(tokens), head_dim]."""
    adapter: str | None
    logits: Any = None
    """The logits after the last token when `tokens` is a whole prompt: the same prompt again
    starts decoding at once."""
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in self.layers)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by bisection on slice equality (compared in C, not a loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    def __init__(self, max_bytes: int, block: int) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._ids = itertools.count()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, ids: list[int], adapter: str | None) -> tuple[Entry | None, int]:
        """The entry to start `ids` from and how many of its tokens to take: all of them when it
        holds this very prompt with its logits, else the longest shared prefix in whole blocks
        (at least one token is left to evaluate: its logits start the reply)."""
        best, shared = None, 0
        for key, entry in self._entries.items():
            if entry.adapter != adapter:
                continue
            if entry.logits is not None and entry.tokens == ids:
                self._entries.move_to_end(key)
                return entry, len(ids)
            n = min(common_prefix(entry.tokens, ids), len(ids) - 1) // self.block * self.block
            if n > shared:
                best, shared, best_key = entry, n, key
        if best is not None:
            self._entries.move_to_end(best_key)
        return best, shared

    def put(self, entry: Entry) -> None:
        """Keep `entry`; one holding a prefix of it, and not a prompt of its own, is dropped."""
        if entry.nbytes > self.max_bytes:
            return
        for key, old in list(self._entries.items()):
            covered = len(old.tokens) <= len(entry.tokens) and entry.tokens[: len(old.tokens)] == old.tokens
            retry = old.logits is not None and old.tokens != entry.tokens  # still the one for a retry
            if covered and old.adapter == entry.adapter and not retry:
                del self._entries[key]
        self._entries[next(self._ids)] = entry
        total = self.nbytes
        while total > self.max_bytes:
            _, gone = self._entries.popitem(last=False)
            total -= gone.nbytes

    def drop_adapter(self, adapter: str) -> None:
        for key in [k for k, e in self._entries.items() if e.adapter == adapter]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()
