"""The benchmarks' workloads as request bodies, shared by Locust and the benchmarks so they send
the same thing: the reference workload (DESIGN.md section 5) and a RAG-shaped one (issue 41)."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import numpy as np

YES, NO = 9454, 2753


@dataclasses.dataclass(frozen=True)
class Workload:
    query_tokens: int = 2000
    items: int = 500
    item_tokens: int = 20
    label_ids: tuple[int, ...] = (YES, NO)
    apply_softmax: bool = True

    @classmethod
    def from_env(cls) -> Workload:
        """MIS_QUERY_TOKENS, MIS_ITEMS, MIS_ITEM_TOKENS, MIS_LABELS ("9454,2753")."""
        d = cls()
        labels = os.environ.get("MIS_LABELS")
        return cls(
            query_tokens=int(os.environ.get("MIS_QUERY_TOKENS", d.query_tokens)),
            items=int(os.environ.get("MIS_ITEMS", d.items)),
            item_tokens=int(os.environ.get("MIS_ITEM_TOKENS", d.item_tokens)),
            label_ids=tuple(int(x) for x in labels.split(",")) if labels else d.label_ids,
        )

    def body(self, seed: int) -> dict[str, Any]:
        """A token-id request; a new seed gives a new query and new items."""
        rng = np.random.default_rng(seed)
        return {
            "query": rng.integers(0, 151_000, self.query_tokens).tolist(),
            "items": rng.integers(0, 151_000, (self.items, self.item_tokens)).tolist(),
            "label_token_ids": list(self.label_ids),
            "apply_softmax": self.apply_softmax,
        }

    def describe(self) -> str:
        return f"Q={self.query_tokens} N={self.items} L={self.item_tokens}"


@dataclasses.dataclass(frozen=True)
class RagWorkload:
    """A RAG pipeline's rerank call as the engine receives it: Qwen3-Reranker's prompt (its
    system turn and the default instruction, then the query; each document followed by the
    template's end), a query of 10-40 words, `items` documents of 50-1,000 tokens with
    long-tailed lengths (log-normal, median 200, clipped; ~2% at the cap). Token ids, split as
    `/v1/rerank` splits its prompt: the template up to the document is the query, each document
    in the rest of it an item. Words are single-token words of the real Qwen3 vocabulary (a
    query of n words is n tokens); the checkpoints are random-weight, so only lengths and the
    template's own tokens matter."""

    items: int = 100
    query_words: tuple[int, int] = (10, 40)
    doc_tokens: tuple[int, int] = (50, 1000)
    median_doc_tokens: int = 200
    apply_softmax: bool = True

    @functools.cached_property
    def _template(self) -> dict[str, Any]:
        # Imported here: Locust and the client-side benches load the tokenizer only for this.
        from models.tokenizer import TextTokenizer, bundled_tokenizer_dir
        from serve_app.rerank import (
            QWEN3_RERANKER_DOCUMENT,
            QWEN3_RERANKER_INSTRUCTION,
            QWEN3_RERANKER_QUERY,
        )

        tok = TextTokenizer(bundled_tokenizer_dir() / "tokenizer.json")
        head, tail = QWEN3_RERANKER_QUERY.format(
            instruction=QWEN3_RERANKER_INSTRUCTION, query="\0"
        ).split("\0")
        suffix = QWEN3_RERANKER_DOCUMENT.split("{document}")[1]
        words = sorted(i for w, i in tok.vocab().items() if re.fullmatch("\u0120[a-z]{3,}", w))
        return {
            "head": tok.encode(head.rstrip(" ")),  # the words carry their leading space
            "tail": tok.encode(tail),
            "suffix": tok.encode(suffix),
            "words": np.asarray(words),
            "labels": (tok.encode("yes")[0], tok.encode("no")[0]),
        }

    @property
    def label_ids(self) -> tuple[int, ...]:
        return self._template["labels"]

    @property
    def query_tokens(self) -> int:
        """The longest query."""
        t = self._template
        return len(t["head"]) + self.query_words[1] + len(t["tail"])

    @property
    def item_tokens(self) -> int:
        """The longest item: a document at the cap and the template's end."""
        return self.doc_tokens[1] + len(self._template["suffix"])

    def doc_lengths(self, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.doc_tokens
        drawn = rng.lognormal(np.log(self.median_doc_tokens), 0.8, self.items)
        return np.clip(np.round(drawn), lo, hi).astype(int)

    def body(self, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        t = self._template
        words = lambda n: rng.choice(t["words"], n).tolist()  # noqa: E731
        n_query = int(rng.integers(self.query_words[0], self.query_words[1] + 1))
        return {
            "query": t["head"] + words(n_query) + t["tail"],
            "items": [words(n) + t["suffix"] for n in self.doc_lengths(rng)],
            "label_token_ids": list(self.label_ids),
            "apply_softmax": self.apply_softmax,
        }

    def describe(self) -> str:
        lo, hi = self.doc_tokens
        return (
            f"RAG: Qwen3-Reranker prompt, query {self.query_words[0]}-{self.query_words[1]} "
            f"words, N={self.items} documents of {lo}-{hi} tokens "
            f"(+{len(self._template['suffix'])} template)"
        )


def check_response(payload: Any, workload: Workload) -> str | None:
    """None when the response is a well-formed answer for `workload`, else what is wrong."""
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, list):
        return "no scores"
    if len(scores) != workload.items:
        return f"{len(scores)} score rows for {workload.items} items"
    arr = np.asarray(scores, dtype=float)
    if arr.shape != (workload.items, len(workload.label_ids)):
        return f"scores shape {arr.shape}"
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        return "a probability outside [0, 1]"
    return None


AnyWorkload = Workload | RagWorkload
