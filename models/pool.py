"""Which queries the device KV pool holds (host-side bookkeeping; the arrays live in the engine).

The pool is one [layers, kv_heads, tokens, head_dim] buffer per K and V. A cached query owns a
contiguous range of it; ranges are aligned and allocated first-fit, and the least recently used
queries are evicted when a new one does not fit. Queries a forward being planned refers to are
pinned until that plan is done, so an allocation can never overwrite them.

Bookkeeping is transactional: a range is allocated while an engine call is planned, before any
forward has written it. It counts as the query's only once the forward that writes it has
returned (`commit`); when a forward fails, every allocation not committed is dropped
(`rollback`), so no later call reads K/V that were never written.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence


class PrefixPool:
    def __init__(self, tokens: int, align: int):
        if tokens < 1 or align < 1:
            raise ValueError(f"pool of {tokens} tokens aligned to {align}: both must be >= 1")
        self.tokens = tokens
        self.align = align
        # key (the query's tokens, or what the caller keys it by) -> (start, reserved length),
        # least recently used first
        self._entries: collections.OrderedDict[Hashable, tuple[int, int]] = (
            collections.OrderedDict()
        )
        self._uncommitted: set[Hashable] = set()  # allocated, not written yet

    def find(self, query: Sequence[int], key: Hashable | None = None) -> int | None:
        """Start of a cached query's keys, or None; a hit makes it the most recently used.
        `key`: what the query is cached under (default its tokens; the engine keys a query by
        its adapter too)."""
        key = tuple(query) if key is None else key
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def allocate(
        self, query: Sequence[int], pinned: set[Hashable], key: Hashable | None = None
    ) -> int | None:
        """Reserve a range for `query` under `key` (default its tokens), evicting unpinned
        entries, oldest first; None when it cannot be had (longer than the pool, or the rest
        is pinned)."""
        key = tuple(query) if key is None else key
        need = -(-len(query) // self.align) * self.align
        if need > self.tokens:
            return None
        while (start := self._first_fit(need)) is None:
            victim = next((q for q in self._entries if q not in pinned and q != key), None)
            if victim is None:
                return None
            del self._entries[victim]
        self._entries[key] = (start, need)
        self._uncommitted.add(key)
        return start

    def commit(self, keys: Sequence[Hashable]) -> None:
        """The forward that writes these keys' K/V has returned: they are cached now."""
        self._uncommitted.difference_update(keys)

    def rollback(self) -> list[Hashable]:
        """Drop every allocation not committed (its forward failed or never ran); returns the
        dropped queries."""
        dropped = [q for q in self._entries if q in self._uncommitted]
        for q in dropped:
            del self._entries[q]
        self._uncommitted.clear()
        return dropped

    def forget(self, keys) -> None:
        """Drop these cached queries (their K/V will never be read again: an adapter removed);
        their ranges are free at once rather than when evicted."""
        for key in list(keys):
            self._entries.pop(key, None)
            self._uncommitted.discard(key)

    def cached(self) -> list[Hashable]:
        """What the pool holds, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget every query (the device pool's contents can no longer be trusted)."""
        self._entries.clear()
        self._uncommitted.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _first_fit(self, need: int) -> int | None:
        pos = 0
        for start, length in sorted(self._entries.values()):
            if start - pos >= need:
                return pos
            pos = max(pos, start + length)
        return pos if self.tokens - pos >= need else None
