"""Padded shape buckets: a short ladder of sizes so a stream of varied requests reuses a few
compiled programs instead of compiling one per shape."""

from __future__ import annotations


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def pow2_upto(limit: int, minimum: int = 1) -> list[int]:
    """Every bucket up to `limit`: minimum, 2 * minimum, ... (powers of two), >= limit last."""
    sizes = [pow2_bucket(1, minimum)]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes
