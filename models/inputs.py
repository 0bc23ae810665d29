"""Request inputs shared by the engine and the HTTP ingress (no JAX here): tokenization,
token-id validation and the unit of work sent to a scorer replica."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from models.tokenizer import TextTokenizer
from serve_app.schema import ScoreRequest


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


def tokenize_request(
    request: ScoreRequest, tokenizer: TextTokenizer | None
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the query and every item (text is tokenized separately per piece)."""
    if isinstance(request.query, list):
        return list(request.query), [list(it) for it in request.items]  # type: ignore[arg-type]
    if tokenizer is None:
        raise ScoringInputError("query: text input needs a tokenizer.json in the model dir")
    query_ids = tokenizer.encode(request.query)
    items_ids = tokenizer.encode_batch(list(request.items))  # type: ignore[arg-type]
    if not query_ids:
        raise ScoringInputError("query: tokenizes to zero tokens")
    for i, ids in enumerate(items_ids):
        if not ids:
            raise ScoringInputError(f"items[{i}]: tokenizes to zero tokens")
    return query_ids, items_ids


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
