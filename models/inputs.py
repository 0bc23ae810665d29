"""What the engine scores and how it says no (no JAX here): the unit of work sent to a scorer
replica, and its checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


class ScoringInputError(ValueError):
    """A request that cannot be scored; the message starts with the offending field."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One query and a slice of its items: what one scorer call scores."""

    query: tuple[int, ...]
    items: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]
    apply_softmax: bool = False
    item_first: bool = False


def check_token_ids(
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    vocab_size: int,
) -> None:
    """Raise ScoringInputError naming the field for empty inputs or ids outside the vocab."""

    def first_bad(ids: Sequence[int]) -> int | None:
        return next((t for t in ids if not 0 <= t < vocab_size), None)

    def outside(field: str, t: int) -> ScoringInputError:
        return ScoringInputError(
            f"{field}: token id {t} is outside the vocabulary [0, {vocab_size})"
        )

    if not query:
        raise ScoringInputError("query: must not be empty")
    if (t := first_bad(query)) is not None:
        raise outside("query", t)
    for i, it in enumerate(items):
        if not it:
            raise ScoringInputError(f"items[{i}]: must not be empty")
        if (t := first_bad(it)) is not None:
            raise outside(f"items[{i}]", t)
    if not label_ids:
        raise ScoringInputError("label_token_ids: must not be empty")
    if (t := first_bad(label_ids)) is not None:
        raise outside("label_token_ids", t)


def check_limits(
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    limits: Mapping[str, int],
) -> None:
    """Raise ScoringInputError naming the field and the limit (`max_query_tokens`,
    `max_item_tokens`, `max_labels`) when the input is larger than it."""
    if len(query) > limits["max_query_tokens"]:
        raise ScoringInputError(
            f"query: {len(query)} tokens exceed max_query_tokens={limits['max_query_tokens']}"
        )
    for i, it in enumerate(items):
        if len(it) > limits["max_item_tokens"]:
            raise ScoringInputError(
                f"items[{i}]: {len(it)} tokens exceed max_item_tokens={limits['max_item_tokens']}"
            )
    if len(label_ids) > limits["max_labels"]:
        raise ScoringInputError(
            f"label_token_ids: {len(label_ids)} labels exceed max_labels={limits['max_labels']}"
        )
    if len(set(label_ids)) != len(label_ids):
        raise ScoringInputError("label_token_ids: must not contain duplicates")


def check_chunk(chunk: Chunk, vocab_size: int, limits: Mapping[str, int]) -> None:
    """Everything the engine needs of a chunk, or a ScoringInputError naming the field."""
    check_token_ids(chunk.query, chunk.items, chunk.label_ids, vocab_size)
    check_limits(chunk.query, chunk.items, chunk.label_ids, limits)
