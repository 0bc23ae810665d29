"""A `/v1/score` request over the engine interface, once, for the HTTP ingress and the offline
CLI alike: tokenize, check, cut into chunks, merge the scores in item order, build the response
body. Pure Python: importing it imports no Ray and no JAX."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mis_api.chunking import split_items
from mis_api.long_items import Fitted, Windows, fit_items, item_budget, whole_fits
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
    request: ScoreRequest,
    tokenizer: TextTokenizer | None,
    items: Sequence[int] | None = None,
    query_ids: list[int] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the query and every item (text is tokenized separately per piece);
    `items`: only these items' (the others: []); `query_ids`: the query's, already made."""
    if isinstance(request.query, list):
        return list(request.query), [list(it) for it in request.items]  # type: ignore[arg-type]
    if tokenizer is None:
        raise ScoringInputError("query: text input needs a tokenizer.json in the model dir")
    if query_ids is None:
        query_ids = tokenizer.encode(request.query)
    texts = list(request.items)
    which = range(len(texts)) if items is None else items
    items_ids: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(which, tokenizer.encode_batch([texts[i] for i in which]), strict=True):
        items_ids[i] = ids
    if not query_ids:
        raise ScoringInputError("query: tokenizes to zero tokens")
    for i in which:
        if not items_ids[i]:
            raise ScoringInputError(f"items[{i}]: tokenizes to zero tokens")
    return query_ids, items_ids


def frame_ids(request: ScoreRequest, tokenizer: TextTokenizer | None) -> tuple[list, list]:
    """The request's item_prefix and item_suffix as token ids (none: [])."""
    out = []
    for name in ("item_prefix", "item_suffix"):
        value = getattr(request, name)
        if value is None or isinstance(value, list):
            out.append(list(value or []))
        elif tokenizer is None:
            raise ScoringInputError(f"{name}: text input needs a tokenizer.json in the model dir")
        else:
            out.append(tokenizer.encode(value))
    return out[0], out[1]


def _fit(
    request: ScoreRequest, tokenizer: TextTokenizer | None, max_item_tokens: int
) -> tuple[list[int], Fitted]:
    """The query's token ids and the items as scored. Text items with a frame are tokenized
    with it as one text (the prompt's own tokens) and cut in parts only where that is over a
    limit: the frame's and the document's tokens apart, so a cut never touches the frame."""
    prefix, suffix = frame_ids(request, tokenizer)
    policy = request.long_items
    text = isinstance(request.query, str)
    if not (text and (prefix or suffix)) or tokenizer is None:
        query, items = tokenize_request(request, tokenizer)
        fitted = fit_items(len(query), items, policy, max_item_tokens, prefix=prefix, suffix=suffix)
        return query, fitted
    framed = [f"{request.item_prefix or ''}{it}{request.item_suffix or ''}" for it in request.items]
    whole = tokenizer.encode_batch(framed)
    frame = len(prefix) + len(suffix)
    query = tokenizer.encode(request.query)  # type: ignore[arg-type]
    _, budget = item_budget(len(query), policy, max_item_tokens, frame)
    cut = [i for i, w in enumerate(whole) if not whole_fits(len(w), frame, budget, max_item_tokens)]
    query, items = tokenize_request(request, tokenizer, cut, query)
    fitted = fit_items(
        len(query), items, policy, max_item_tokens, prefix=prefix, suffix=suffix, whole=whole
    )
    return query, fitted


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
) -> tuple[list[int], list[list[int]], Windows | None]:
    """A request's token ids, each item within the limits by its `long_items` (cut, or cut
    into windows: then which scored items are whose) and framed by its `item_prefix` and
    `item_suffix`, checked against every limit; raises ScoringInputError."""
    cap = request.long_items.max_prompt_tokens
    longest = engine.max_query_tokens + engine.max_item_tokens
    if cap is not None and cap > longest:
        raise ScoringInputError(
            f"long_items.max_prompt_tokens: {cap} is more than the longest prompt this server "
            f"takes (max_query_tokens + max_item_tokens = {longest})"
        )
    policy = request.long_items
    columns = len(request.label_token_ids) or len(head[1])
    if policy.mode == "chunk" and policy.pool_column >= max(columns, 1):
        raise ScoringInputError(
            f"long_items.pool_column: {policy.pool_column} is not a score column (the request "
            f"has {columns})"
        )
    query, fitted = _fit(request, tokenizer, engine.max_item_tokens)
    if fitted.windows is not None and len(fitted.items) > max_items:
        raise ScoringInputError(
            f"items: {len(request.items)} items cut into {len(fitted.items)} windows exceed "
            f"max_items_per_request={max_items} (fewer long_items.max_chunks, or fewer items)"
        )
    check_request(
        query,
        fitted.items,
        request.label_token_ids,
        vocab_size=vocab_size,
        engine=engine,
        max_items=max_items,
        head=head,
    )
    return query, fitted.items, fitted.windows


def make_chunks(
    request: ScoreRequest,
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    chunk_items: int,
    chunk_tokens: int,
    adapter: str | None = None,
) -> list[Chunk]:
    """The request's items in consecutive chunks of at most `chunk_items` items and
    `chunk_tokens` item tokens (item order kept), scored with LoRA adapter `adapter` (None:
    the base model)."""
    q, labels = tuple(query), tuple(request.label_token_ids)
    flags = (request.apply_softmax, request.item_first, adapter)
    return [
        Chunk(q, tuple(tuple(items[i]) for i in r), labels, *flags)
        for r in split_items(items, chunk_items, chunk_tokens)
    ]


def merge_scores(parts: Sequence[np.ndarray], n_labels: int) -> np.ndarray:
    """Chunk scores, in chunk order, as one [items, labels] array."""
    return np.concatenate(parts) if parts else np.zeros((0, n_labels))


def response_body(
    scores: np.ndarray, model: str, n_tokens: int, windows: Windows | None = None
) -> dict[str, Any]:
    """The `/v1/score` response (mis_api.schema.ScoreResponse) as a plain dict: built once,
    serialized once, no model round trip. `scores`: one row per scored item (per window when
    `windows`: pooled here into one per request item). `n_tokens`: the tokens scored."""
    body = {
        "scores": (scores if windows is None else windows.pool_scores(scores)).tolist(),
        "model": model,
        "object": "scoring",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    if windows is not None:
        body["windows"] = list(windows.counts)
    return body


def prompt_tokens(query: Sequence[int], items: Sequence[Sequence[int]]) -> int:
    return len(query) + sum(map(len, items))
