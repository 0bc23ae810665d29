"""A `/v1/score` request over the engine interface, once, for the HTTP ingress and the offline
CLI alike: tokenize, check, cut into chunks, merge the scores in item order, build the response
body. Pure Python: importing it imports no Ray and no JAX."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mis_api.chunking import split_items
from mis_api.schema import ScoreRequest
from models.engine_config import EngineConfig
from models.inputs import (
    Chunk,
    ScoringInputError,
    check_chunk,
    check_head_labels,
    check_limits,
    check_token_ids,
)
from models.tokenizer import TextTokenizer


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


def check_request(
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    vocab_size: int,
    engine: EngineConfig,
    max_items: int,
    head: tuple[str, Sequence[str]] = ("lm", ()),
) -> None:
    """Everything a request must satisfy before any of it is scored; raises
    ScoringInputError naming the field and the limit. `head`: the model's head kind ("lm" or
    "classification") and class labels (the engine's head_kind and class_labels)."""
    if len(items) > max_items:
        raise ScoringInputError(
            f"items: {len(items)} items exceed max_items_per_request={max_items}"
        )
    check_head_labels(label_ids, *head)
    if head[0] == "classification":
        chunk = Chunk(tuple(query), tuple(map(tuple, items)), ())
        check_chunk(chunk, vocab_size, engine.limits, classification=True)
        return
    check_limits(query, items, label_ids, engine.limits)
    check_token_ids(query, items, label_ids, vocab_size)


def prepare_request(
    request: ScoreRequest,
    tokenizer: TextTokenizer | None,
    *,
    vocab_size: int,
    engine: EngineConfig,
    max_items: int,
    head: tuple[str, Sequence[str]] = ("lm", ()),
) -> tuple[list[int], list[list[int]]]:
    """A request's token ids, checked against every limit; raises ScoringInputError."""
    query, items = tokenize_request(request, tokenizer)
    check_request(
        query,
        items,
        request.label_token_ids,
        vocab_size=vocab_size,
        engine=engine,
        max_items=max_items,
        head=head,
    )
    return query, items


def make_chunks(
    request: ScoreRequest,
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    chunk_items: int,
    chunk_tokens: int,
) -> list[Chunk]:
    """The request's items in consecutive chunks of at most `chunk_items` items and
    `chunk_tokens` item tokens (item order kept)."""
    q, labels = tuple(query), tuple(request.label_token_ids)
    flags = (request.apply_softmax, request.item_first)
    return [
        Chunk(q, tuple(tuple(items[i]) for i in r), labels, *flags)
        for r in split_items(items, chunk_items, chunk_tokens)
    ]


def merge_scores(parts: Sequence[np.ndarray], n_labels: int) -> np.ndarray:
    """Chunk scores, in chunk order, as one [items, labels] array."""
    return np.concatenate(parts) if parts else np.zeros((0, n_labels))


def response_body(scores: np.ndarray, model: str, n_tokens: int) -> dict[str, Any]:
    """The `/v1/score` response (mis_api.schema.ScoreResponse) as a plain dict: built once,
    serialized once, no model round trip."""
    return {
        "scores": scores.tolist(),
        "model": model,
        "object": "scoring",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


def prompt_tokens(query: Sequence[int], items: Sequence[Sequence[int]]) -> int:
    return len(query) + sum(map(len, items))
