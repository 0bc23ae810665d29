"""Which queries the device KV pool holds (host-side bookkeeping; the arrays live in the engine).

The pool is one [layers, kv_heads, tokens, head_dim] buffer per K and V. A cached query owns a
contiguous range of it; ranges are aligned and allocated first-fit, and the least recently used
queries are evicted when a new one does not fit. Queries a forward being planned refers to are
pinned until that plan is done, so an allocation can never overwrite them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class PrefixPool:
    def __init__(self, tokens: int, align: int):
        if tokens < 1 or align < 1:
            raise ValueError(f"pool of {tokens} tokens aligned to {align}: both must be >= 1")
        self.tokens = tokens
        self.align = align
        # query tokens -> (start, reserved length), least recently used first
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[int, int]] = (
            collections.OrderedDict()
        )

    def find(self, query: Sequence[int]) -> int | None:
        """Start of a cached query's keys, or None; a hit makes it the most recently used."""
        key = tuple(query)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def allocate(self, query: Sequence[int], pinned: set[tuple[int, ...]]) -> int | None:
        """Reserve a range for `query` (evicting unpinned queries, oldest first); None when it
        cannot be had (longer than the pool, or the rest is pinned)."""
        key = tuple(query)
        need = -(-len(key) // self.align) * self.align
        if need > self.tokens:
            return None
        while (start := self._first_fit(need)) is None:
            victim = next((q for q in self._entries if q not in pinned and q != key), None)
            if victim is None:
                return None
            del self._entries[victim]
        self._entries[key] = (start, need)
        return start

    def _first_fit(self, need: int) -> int | None:
        pos = 0
        for start, length in sorted(self._entries.values()):
            if start - pos >= need:
                return pos
            pos = max(pos, start + length)
        return pos if self.tokens - pos >= need else None
