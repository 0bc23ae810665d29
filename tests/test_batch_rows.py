"""Several multi-item rows (chunks, possibly of different requests) in one forward."""

from __future__ import annotations

import numpy as np
import pytest

from models.inputs import Chunk
from tests.conftest import LABELS, random_request


@pytest.mark.parametrize(
    ("mode", "mask"), [("prefix", "auto"), ("packed", "segment"), ("packed", "dense")]
)
def test_rows_in_one_forward_change_no_bit(engine, mode, mask):
    query, items = random_request(seed=60, n_items=60, max_item=20)
    one = engine("qwen3", mode, mask, rows=1)
    many = engine("qwen3", mode, mask, rows=4)
    before = many.stats["forwards"]
    got = many.score_ids(query, items, LABELS)
    assert many.stats["forwards"] - before < len(items) // 8  # rows really were packed
    np.testing.assert_array_equal(got, one.score_ids(query, items, LABELS))


def test_chunks_of_different_requests_share_forwards(engine):
    eng = engine("qwen3", "prefix", rows=4)
    chunks = []
    for seed in range(6):
        query, items = random_request(seed=70 + seed, n_items=5, max_item=8)
        chunks.append(
            Chunk(
                tuple(query),
                tuple(map(tuple, items)),
                tuple(LABELS[: 2 + seed % 2]),
                apply_softmax=bool(seed % 2),
            )
        )
    before = eng.stats["forwards"]
    together = eng.score_chunks(chunks)
    assert eng.stats["forwards"] - before < len(chunks)
    alone = engine("qwen3", "prefix", rows=1)
    for c, got in zip(chunks, together, strict=True):
        ref = alone.score_ids(c.query, c.items, c.label_ids, apply_softmax=c.apply_softmax)
        np.testing.assert_array_equal(got, ref)
