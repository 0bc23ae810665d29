"""Chunks of many requests share forwards, and batching changes no bit of any answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.buckets import pow2_upto
from models.config import PRESETS
from models.decoder import label_logits_and_lse
from models.engine import HEAD_ROWS, ScoringEngine, score_ids
from models.engine_config import MIN_ROWS, EngineConfig
from models.inputs import Chunk
from tests.conftest import LABELS, TEST_ENGINE, random_request


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


def test_lm_head_rows_do_not_depend_on_how_many_are_scored():
    """A score position's label logits and full-vocab log-sum-exp are the same bits whether
    64 or 512 positions go through the LM head at once (every size of the head's ladder):
    the LSE once changed in 5 of 64 rows, so a request's full-vocab scores depended on what
    it was batched with."""
    cfg = PRESETS["qwen3-tiny"]
    rng = np.random.default_rng(0)
    head = rng.standard_normal((cfg.vocab_size, cfg.hidden_size), np.float32) * 0.05
    h = rng.standard_normal((HEAD_ROWS, cfg.hidden_size)).astype(np.float32)
    run = jax.jit(label_logits_and_lse)
    labels = jnp.asarray(LABELS, jnp.int32)
    want = [np.asarray(a) for a in run(jnp.asarray(h[:MIN_ROWS]), jnp.asarray(head), labels)]
    for rows in pow2_upto(HEAD_ROWS, MIN_ROWS)[1:]:
        got = run(jnp.asarray(h[:rows]), jnp.asarray(head), labels)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g)[:MIN_ROWS], w)


def test_what_shares_a_query_block_does_not_change_the_query(ckpts):
    """A query of 281 tokens ends 25 tokens into its last block. Prefilled once with a short
    item filling that block and once with a long item that does not fit it, its K/V (and so
    every later item's scores read from the cache) must be the same bits: the attention of
    the query's last block once tiled its keys by what else was in the block."""
    rng = np.random.default_rng(61)
    query = tuple(rng.integers(0, 151_000, 281).tolist())
    short = tuple(rng.integers(0, 151_000, 5).tolist())
    long = tuple(rng.integers(0, 151_000, 50).tolist())
    later = tuple(tuple(rng.integers(0, 151_000, 9).tolist()) for _ in range(6))
    scores = []
    for first in (short, long):
        eng = ScoringEngine(ckpts["qwen3"], EngineConfig(**TEST_ENGINE, mode="prefix"))
        eng.score([Chunk(query, (first,), tuple(LABELS), False)])  # the query's prefill
        (got,) = eng.score([Chunk(query, later, tuple(LABELS), False)])  # from the cache
        assert eng.stats()["prefix_hits"] == 1
        scores.append(got)
    np.testing.assert_array_equal(scores[0], scores[1])
