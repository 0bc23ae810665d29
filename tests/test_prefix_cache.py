"""The prefix pool: a query is prefilled once per replica, its K/V reused by every later chunk
and request; allocation evicts the least recently used; a bad chunk fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from models.engine import EngineConfig, ScoringEngine, score_ids
from models.inputs import Chunk, EngineBroken, ScoringInputError
from models.pool import PrefixPool
from tests.conftest import LABELS, TEST_ENGINE, random_request


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


def _calls_of_one_engine_call(seed: int) -> list[Chunk]:
    """Four chunks of four new queries: each query and its items fill most of a forward of the
    test engine (1,024 tokens), so one engine call runs four forwards, each prefilling one."""
    rng = np.random.default_rng(seed)
    return [
        Chunk(
            tuple(rng.integers(0, 151_000, 400).tolist()),
            tuple(tuple(rng.integers(0, 151_000, n).tolist()) for n in rng.integers(5, 40, 12)),
            tuple(LABELS),
        )
        for _ in range(4)
    ]


def _fail_on(monkeypatch, eng, method: str, nth: int, consume: bool = False) -> list[int]:
    """The engine's `method` ("_body" or "_head") gives a program that raises on the nth forward
    (1-based); `consume`: it first deletes the pool buffers it was donated, as a device fault
    mid-program would. Returns the call counter."""
    calls = [0]
    build = getattr(eng, method)

    def patched(*a, **kw):
        program = build(*a, **kw)
        calls[0] += 1
        if calls[0] != nth:
            return program

        def failing(params, *args):
            if consume:
                for buf in args[:2]:  # the body's pool_k, pool_v
                    buf.delete()
            raise RuntimeError(f"injected failure in {method} of forward {nth}")

        return failing

    monkeypatch.setattr(eng, method, patched)
    return calls


@pytest.mark.parametrize("method", ["_head", "_body"])
def test_a_failed_forward_leaves_no_stale_query_in_the_pool(ckpts, monkeypatch, method):
    """Forward 2 of 4 fails (its head after the body wrote the pool, or its body before
    anything ran): the queries planned for forwards 2-4 were never (all) written, so the same
    chunks scored again, and a later request with one of those queries, prefill them again
    and equal a fresh engine's scores. Before the pool was transactional they read K/V never
    written (0.62 off a fresh engine)."""
    config = EngineConfig(**TEST_ENGINE, mode="prefix")
    eng, fresh = ScoringEngine(ckpts["qwen3"], config), ScoringEngine(ckpts["qwen3"], config)
    chunks = _calls_of_one_engine_call(seed=60)
    calls = _fail_on(monkeypatch, eng, method, nth=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        eng.score(chunks)
    assert calls[0] == 2 and eng.broken is None
    monkeypatch.undo()
    assert len(eng.pool) == 1  # forward 1's query: written, and its forward returned
    again, expected = eng.score(chunks), fresh.score(chunks)
    for got, want in zip(again, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    later = Chunk(chunks[3].query, chunks[0].items[:3], tuple(LABELS))
    np.testing.assert_array_equal(eng.score([later])[0], fresh.score([later])[0])


def test_a_forward_that_consumed_the_pool_breaks_the_engine(ckpts, monkeypatch):
    """A forward that fails after its donated pool buffers were consumed leaves the cache
    unknowable: the engine refuses every later call (EngineBroken) instead of scoring on."""
    eng = ScoringEngine(ckpts["qwen3"], EngineConfig(**TEST_ENGINE, mode="prefix"))
    chunks = _calls_of_one_engine_call(seed=61)
    _fail_on(monkeypatch, eng, "_body", nth=2, consume=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        eng.score(chunks)
    monkeypatch.undo()
    assert eng.broken is not None and len(eng.pool) == 0
    with pytest.raises(EngineBroken, match="donated"):
        eng.score(chunks[:1])
