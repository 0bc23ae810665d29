"""The prefix LRU: chunks of one query prefill it once; a bad chunk fails alone."""

from __future__ import annotations

import numpy as np

from models.inputs import Chunk, ScoringInputError
from tests.conftest import LABELS, random_request


def test_chunks_of_one_query_prefill_once(engine):
    eng = engine("qwen3", "prefix")
    query, items = random_request(seed=50, n_items=12)
    chunks = [
        Chunk(tuple(query), tuple(map(tuple, items[i : i + 4])), tuple(LABELS))
        for i in range(0, 12, 4)
    ]
    hits, misses = eng.stats["prefix_hits"], eng.stats["prefix_misses"]
    out = eng.score_chunks(chunks)
    assert eng.stats["prefix_misses"] - misses == 1
    assert eng.stats["prefix_hits"] - hits == 2
    np.testing.assert_array_equal(np.concatenate(out), eng.score_ids(query, items, LABELS))


def test_a_bad_chunk_fails_alone(engine):
    eng = engine("qwen3", "prefix")
    query, items = random_request(seed=51, n_items=4)
    good = Chunk(tuple(query), tuple(map(tuple, items)), tuple(LABELS))
    bad = Chunk(tuple(query), ((1, 10**9),), tuple(LABELS))
    out = eng.score_chunks([good, bad, good])
    assert isinstance(out[1], ScoringInputError) and "items[0]" in str(out[1])
    np.testing.assert_array_equal(out[0], out[2])
