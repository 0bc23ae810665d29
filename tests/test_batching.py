"""Chunks of many requests share forwards, and batching changes no bit of any answer."""

from __future__ import annotations

import numpy as np
import pytest

from models.engine import score_ids
from models.inputs import Chunk
from tests.conftest import LABELS, random_request


def _mixed_chunks(seed: int, n: int) -> list[Chunk]:
    """Requests of mixed sizes: queries 5..400 tokens, 1..40 items of 1..60 tokens, one to
    three labels, softmax or not, a few item_first; two of them share a query."""
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(n):
        query, items = random_request(
            seed=seed * 100 + i,
            n_items=int(rng.integers(1, 41)),
            q_len=int(rng.integers(5, 401)),
            max_item=int(rng.integers(1, 61)),
        )
        if i == 1:
            query = list(chunks[0].query)
        labels = tuple(LABELS[: int(rng.integers(1, 4))])
        chunks.append(
            Chunk(tuple(query), tuple(map(tuple, items)), labels, bool(i % 2), i % 5 == 4)
        )
    return chunks


@pytest.mark.parametrize("mode", ["serial", "packed", "prefix"])
def test_batched_equals_each_request_alone(engine, mode):
    eng = engine("qwen3", mode)
    chunks = _mixed_chunks(seed=60, n=8)
    before = eng.stats()["forwards"]
    together = eng.score(chunks)
    shared = eng.stats()["forwards"] - before
    alone = [score_ids(eng, c.query, c.items, c.label_ids, apply_softmax=c.apply_softmax,
                       item_first=c.item_first) for c in chunks]  # fmt: skip
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_array_equal(got, want)
    one_by_one = eng.stats()["forwards"] - before - shared
    assert shared < one_by_one  # requests really shared forwards


def test_chunks_of_different_requests_share_one_forward(engine):
    eng = engine("qwen3", "prefix")
    chunks = []
    for seed in range(6):
        query, items = random_request(seed=70 + seed, n_items=5, max_item=8)
        labels = tuple(LABELS[: 2 + seed % 2])
        chunks.append(Chunk(tuple(query), tuple(map(tuple, items)), labels, bool(seed % 2)))
    before = eng.stats()["forwards"]
    together = eng.score(chunks)
    assert eng.stats()["forwards"] - before == 1
    for c, got in zip(chunks, together, strict=True):
        want = score_ids(eng, c.query, c.items, c.label_ids, apply_softmax=c.apply_softmax)
        np.testing.assert_array_equal(got, want)
