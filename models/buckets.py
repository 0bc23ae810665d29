"""Padded shape buckets: a short ladder of sizes so a stream of varied requests reuses a few
compiled programs instead of compiling one per shape."""

from __future__ import annotations


def ladder_bucket(n: int, minimum: int) -> int:
    """Smallest size >= n on the ladder minimum * {1, 1.5, 2, 3, 4, 6, 8, ...} (waste < 50%)."""
    if minimum <= 0 or minimum % 2:
        raise ValueError(f"{minimum=} must be a positive even number")
    size = minimum
    while size < n:
        size = size * 3 // 2 if _is_power_step(size, minimum) else size * 4 // 3
    return size


def _is_power_step(size: int, minimum: int) -> bool:
    ratio = size // minimum
    return size % minimum == 0 and ratio & (ratio - 1) == 0


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def pow2_upto(limit: int, minimum: int = 1) -> list[int]:
    sizes = [pow2_bucket(1, minimum)]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes
