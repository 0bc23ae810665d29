"""What the engine scores and how it says no (no JAX here): the unit of work sent to a scorer
replica, and its checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


class ScoringInputError(ValueError):
    """A request that cannot be scored; the message starts with the offending field."""


class EngineBroken(RuntimeError):
    """An engine that must not score again: a forward failed after the device pool's buffers
    were handed to it (donated), so the cached K/V may be gone or half written. Every later
    call raises this; the owner replaces the engine."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One query and a slice of its items: what one scorer call scores. For a model with a
    classification head `label_ids` is empty (the engine reads none: it returns each item's
    class logits or probabilities)."""

    query: tuple[int, ...]
    items: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]
    apply_softmax: bool = False
    item_first: bool = False
    adapter: str | None = None  # a LoRA adapter's name (the engine's registry); None: the base


class UnknownAdapter(ScoringInputError):
    """A chunk names an adapter the engine does not serve."""


def check_token_ids(
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    vocab_size: int,
) -> None:
    """Raise ScoringInputError naming the field for empty inputs or ids outside the vocab."""
    _check_text_ids(query, items, vocab_size)
    if not label_ids:
        raise ScoringInputError("label_token_ids: must not be empty")
    if (t := _first_bad(label_ids, vocab_size)) is not None:
        raise _outside("label_token_ids", t, vocab_size)


def _first_bad(ids: Sequence[int], vocab_size: int) -> int | None:
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def _outside(field: str, t: int, vocab_size: int) -> ScoringInputError:
    return ScoringInputError(f"{field}: token id {t} is outside the vocabulary [0, {vocab_size})")


def _check_text_ids(query: Sequence[int], items: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not query:
        raise ScoringInputError("query: must not be empty")
    if (t := _first_bad(query, vocab_size)) is not None:
        raise _outside("query", t, vocab_size)
    for i, it in enumerate(items):
        if not it:
            raise ScoringInputError(f"items[{i}]: must not be empty")
        if (t := _first_bad(it, vocab_size)) is not None:
            raise _outside(f"items[{i}]", t, vocab_size)


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


def check_head_labels(label_ids: Sequence[int], head_kind: str, classes: Sequence[str]) -> None:
    """The labels a request may send for the model's head ("lm" or "classification"): label
    tokens for an LM head, none for a classification head (its classes are fixed)."""
    if head_kind == "classification" and label_ids:
        raise ScoringInputError(
            f"label_token_ids: this model has a classification head (classes {list(classes)}); "
            "it scores every class and takes no label_token_ids"
        )
    if head_kind == "lm" and not label_ids:
        raise ScoringInputError("label_token_ids: must not be empty")


def check_chunk(
    chunk: Chunk, vocab_size: int, limits: Mapping[str, int], classification: bool = False
) -> None:
    """Everything the engine needs of a chunk, or a ScoringInputError naming the field. With a
    classification head the chunk's label_ids are not read (and not checked)."""
    if classification:
        _check_text_ids(chunk.query, chunk.items, vocab_size)
        check_limits(chunk.query, chunk.items, (), limits)
        return
    check_token_ids(chunk.query, chunk.items, chunk.label_ids, vocab_size)
    check_limits(chunk.query, chunk.items, chunk.label_ids, limits)
