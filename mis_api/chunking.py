"""Split a request's items into chunks (by item count and token budget) and merge results."""

from __future__ import annotations

from collections.abc import Sequence


def split_items(items: Sequence[Sequence[int]], max_items: int, max_tokens: int) -> list[range]:
    """Consecutive index ranges: each holds <= max_items items and <= max_tokens item tokens
    (an item longer than the budget gets a chunk of its own). Item order is preserved."""
    chunks: list[range] = []
    start = tokens = 0
    for i, it in enumerate(items):
        if i > start and (i - start >= max_items or tokens + len(it) > max_tokens):
            chunks.append(range(start, i))
            start, tokens = i, 0
        tokens += len(it)
    if start < len(items):
        chunks.append(range(start, len(items)))
    return chunks
