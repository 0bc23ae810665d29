"""Items longer than the limit: refused, truncated, or cut into windows whose scores are pooled.

Only an item's own tokens are counted and cut: the query, and a template's parts around every
item (`prefix`, e.g. `Document:`, and `suffix`, e.g. Qwen3-Reranker's
`<|im_end|>...assistant...`), are in every piece, so the scores are those of the prompt a user
gets by cutting the document text and filling the template. A window is an item of the same
request, scored exactly as if alone, so a document's score is the pool of its windows' scores,
whatever shares their forwards. Pure Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from models.inputs import ScoringInputError

# Windows one document may be cut into, whatever a request asks: each is an item to score.
MAX_WINDOWS = 64


class LongItems(BaseModel):
    """What happens to an item (a document) whose tokens exceed the limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["refuse", "truncate", "chunk"] = Field(
        default="refuse",
        description="refuse: 400 naming the item and its length. truncate: cut the item's own "
        "tokens to the limit. chunk: cut it into windows of the limit, each scored as an item, "
        "the item's score pooled over them.",
    )
    max_tokens: StrictInt | None = Field(
        default=None,
        ge=1,
        description="An item's own tokens kept (per window), at most the server's "
        "max_item_tokens less the item_prefix and item_suffix; default that.",
    )
    max_prompt_tokens: StrictInt | None = Field(
        default=None,
        ge=1,
        description="The whole prompt (query, item, suffix) at most this (vLLM's "
        "truncate_prompt_tokens); the item's own tokens are cut to fit.",
    )
    side: Literal["right", "left"] = Field(
        default="right",
        description="truncate: right cuts the end (keeps the start), left cuts the start.",
    )
    overlap: StrictInt = Field(
        default=0, ge=0, description="chunk: tokens each window shares with the one before."
    )
    max_chunks: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_WINDOWS,
        description=f"chunk: windows per item at most (default and cap {MAX_WINDOWS}); the text "
        "past the last one is not scored.",
    )
    pool: Literal["max", "mean", "first"] = Field(
        default="max",
        description="chunk: an item's scores from its windows': max (the row of the window "
        "highest in pool_column), mean (per column) or first (the first window's).",
    )
    pool_column: StrictInt = Field(
        default=0,
        ge=0,
        description="chunk, max: the score column that picks the window (a label_token_ids "
        "index, or a classification model's class).",
    )

    @model_validator(mode="after")
    def _check(self) -> LongItems:
        if self.max_tokens is not None and self.overlap >= self.max_tokens:
            raise ValueError(
                f"overlap: {self.overlap} tokens must be fewer than the window's max_tokens="
                f"{self.max_tokens}"
            )
        return self


REFUSE = LongItems()


@dataclasses.dataclass(frozen=True)
class Windows:
    """How many scored items each item of the request became (chunk mode), and how their
    scores pool into the item's."""

    counts: tuple[int, ...]
    pool: str = "max"
    column: int = 0

    def pool_scores(self, scores: np.ndarray) -> np.ndarray:
        """[windows, columns] in window order -> [items, columns]."""
        ends = np.cumsum(self.counts)
        out = []
        for end, n in zip(ends, self.counts, strict=True):
            rows = scores[end - n : end]
            if self.pool == "first":
                out.append(rows[0])
            elif self.pool == "mean":
                out.append(rows.mean(axis=0))
            else:  # the first window of the highest score: a tie keeps text order
                out.append(rows[int(np.argmax(rows[:, self.column]))])
        return np.stack(out) if out else scores[:0]


@dataclasses.dataclass(frozen=True)
class Fitted:
    """The items to score (each within the limit, prefix and suffix around it) and, in chunk
    mode, which of them are whose windows."""

    items: list[list[int]]
    windows: Windows | None  # None: one scored item per request item


def item_budget(
    query_tokens: int, policy: LongItems, max_item_tokens: int, frame: int
) -> tuple[str, int]:
    """(the binding limit's name, the own tokens it allows an item) for items framed by
    `frame` tokens (prefix and suffix); raises ScoringInputError when that is none."""
    caps = {"max_item_tokens": max_item_tokens - frame}
    if policy.max_tokens is not None:
        caps["long_items.max_tokens"] = policy.max_tokens
    if policy.max_prompt_tokens is not None:
        caps["long_items.max_prompt_tokens"] = policy.max_prompt_tokens - query_tokens - frame
    name, budget = min(caps.items(), key=lambda kv: kv[1])
    if budget < 1:
        prompt = name.endswith("prompt_tokens")
        what = "the query and the template" if prompt else "the template"
        value = policy.max_prompt_tokens if prompt else max_item_tokens
        raise ScoringInputError(
            f"{name}: {value} leaves no room for an item beside {what} "
            f"({frame + query_tokens * prompt} tokens)"
        )
    if policy.mode == "chunk" and policy.overlap >= budget:
        raise ScoringInputError(
            f"long_items.overlap: {policy.overlap} tokens must be fewer than a window's {budget}"
        )
    return name, budget


def whole_fits(whole: int, frame: int, budget: int, max_item_tokens: int) -> bool:
    """A framed item tokenized whole (`whole` tokens) is scored as it is: no cut."""
    return whole <= max_item_tokens and whole - frame <= budget


def fit_items(
    query_tokens: int,
    items: Sequence[Sequence[int]],
    policy: LongItems,
    max_item_tokens: int,
    *,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
    whole: Sequence[Sequence[int]] | None = None,
) -> Fitted:
    """Each item's own tokens within the limits by `policy`, `prefix` before and `suffix`
    after every piece (never cut, counted in `max_item_tokens`); raises ScoringInputError
    naming the item or the option (`long_items.<field>`). `whole`: each item with its frame
    tokenized as one text, scored as it is where it fits (whole_fits; its `items` entry is
    then not read): where text meets the frame it may tokenize otherwise than in parts."""
    prefix, suffix = list(prefix), list(suffix)
    frame = len(prefix) + len(suffix)
    name, budget = item_budget(query_tokens, policy, max_item_tokens, frame)
    if whole is None and all(len(item) <= budget for item in items):  # the common request
        if not frame:
            return Fitted(list(items), None)  # type: ignore[arg-type]
        return Fitted([[*prefix, *item, *suffix] for item in items], None)
    out: list[list[int]] = []
    counts: list[int] = []
    for i, item in enumerate(items):
        if whole is not None and whole_fits(len(whole[i]), frame, budget, max_item_tokens):
            out.append(list(whole[i]))
            counts.append(1)
            continue
        own = list(item)
        if len(own) <= budget:
            pieces = [own]
        elif policy.mode == "truncate":
            pieces = [own[:budget] if policy.side == "right" else own[-budget:]]
        elif policy.mode == "chunk":
            pieces = _windows(own, budget, policy.overlap, policy.max_chunks or MAX_WINDOWS)
        elif name == "max_item_tokens":
            raise ScoringInputError(
                f"items[{i}]: {len(own) + frame} tokens exceed max_item_tokens={max_item_tokens}"
            )
        elif name == "long_items.max_tokens":
            raise ScoringInputError(f"items[{i}]: {len(own)} tokens exceed {name}={budget}")
        else:
            raise ScoringInputError(
                f"items[{i}]: a prompt of {query_tokens + len(own) + frame} tokens exceeds "
                f"{name}={policy.max_prompt_tokens}"
            )
        out.extend([*prefix, *p, *suffix] for p in pieces)
        counts.append(len(pieces))
    chunked = policy.mode == "chunk" and len(out) != len(items)
    windows = Windows(tuple(counts), policy.pool, policy.pool_column) if chunked else None
    return Fitted(out, windows)


def _windows(own: list[int], size: int, overlap: int, most: int) -> list[list[int]]:
    """Windows of `size` tokens from the start, each `overlap` into the one before, the last
    one ending at the item's end (so it overlaps more: no window is a short fragment), at most
    `most` (the text past them is not scored)."""
    starts = [0]
    while starts[-1] + size < len(own) and len(starts) < most:
        starts.append(min(starts[-1] + size - overlap, len(own) - size))
    return [own[s : s + size] for s in starts]
