"""The prefix pool: a query is prefilled once per replica, its K/V reused by every later chunk
and request; allocation evicts the least recently used; a bad chunk fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from models.engine import score_ids
from models.inputs import Chunk, ScoringInputError
from models.pool import PrefixPool
from tests.conftest import LABELS, random_request


def test_chunks_and_requests_of_one_query_prefill_once(engine):
    eng = engine("qwen3", "prefix")
    query, items = random_request(seed=50, n_items=12)
    chunks = [
        Chunk(tuple(query), tuple(map(tuple, items[i : i + 4])), tuple(LABELS))
        for i in range(0, 12, 4)
    ]
    before = eng.stats()
    out = eng.score(chunks)
    after = eng.stats()
    assert after["prefix_misses"] - before["prefix_misses"] == 1
    assert after["prefix_hits"] - before["prefix_hits"] == 2
    again = score_ids(eng, query, items, LABELS)  # a later request: read from the pool
    assert eng.stats()["prefix_misses"] == after["prefix_misses"]
    np.testing.assert_array_equal(np.concatenate(out), again)


def test_a_bad_chunk_fails_alone(engine):
    eng = engine("qwen3", "prefix")
    query, items = random_request(seed=51, n_items=4)
    good = Chunk(tuple(query), tuple(map(tuple, items)), tuple(LABELS))
    bad = Chunk(tuple(query), ((1, 10**9),), tuple(LABELS))
    out = eng.score([good, bad, good])
    assert isinstance(out[1], ScoringInputError) and "items[0]" in str(out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_pool_allocates_aligned_and_evicts_least_recently_used():
    pool = PrefixPool(tokens=512, align=128)
    a, b, c = (1,) * 100, (2,) * 200, (3,) * 129
    assert pool.allocate(a, set()) == 0
    assert pool.allocate(b, set()) == 128  # aligned; 256 reserved
    assert pool.find(a) == 0  # a is now the most recent
    assert pool.allocate(c, set()) == 128  # 256 reserved: b (the oldest) evicted, first fit
    assert pool.find(b) is None  # b was the least recently used: evicted for c
    assert pool.find(c) is not None and pool.find(a) == 0
    assert pool.allocate((4,) * 600, set()) is None  # longer than the pool


def test_pinned_queries_are_never_evicted():
    pool = PrefixPool(tokens=256, align=128)
    a, b = (1,) * 128, (2,) * 128
    pool.allocate(a, set())
    pool.allocate(b, set())
    assert pool.allocate((3,) * 128, pinned={a, b}) is None
    assert pool.find(a) == 0 and pool.find(b) == 128


@pytest.mark.parametrize("n", [1, 127, 128, 129])
def test_reserved_length_is_aligned(n):
    pool = PrefixPool(tokens=1024, align=128)
    pool.allocate((1,) * n, set())
    assert pool.allocate((2,) * 5, set()) == -(-n // 128) * 128
