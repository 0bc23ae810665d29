"""Changing one item changes no other item's score: bit-identical, not "close"."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.engine import score_ids
from models.inputs import Chunk
from models.plan import plan
from tests.conftest import LABELS, MODES, mode_name, random_request

MUTATED = 5
EXACT = [m for m in MODES if m[1] != "dense"]


def _mutations(items):
    """Same length; a little longer and shorter; much longer (the items after it move to other
    blocks); one token."""
    rng = np.random.default_rng(99)
    it = items[MUTATED]
    new = lambda k: rng.integers(0, 151_000, k).tolist()  # noqa: E731
    return {
        "same_length": new(len(it)),
        "longer": it + new(3),
        "shorter": it[:-3],
        "much_longer": it + new(40),
        "one_token": it[:1],
    }


@pytest.mark.parametrize(("mode", "attention"), EXACT)
def test_other_items_bit_identical(engine, record, mode, attention):
    eng = engine("qwen3", mode, attention)
    query, items = random_request(seed=30, n_items=21)
    items[MUTATED] = items[MUTATED][:20] + [7] * max(0, 13 - len(items[MUTATED]))  # 13..20
    keep = np.arange(len(items)) != MUTATED
    for apply_softmax in (True, False):
        base = score_ids(eng, query, items, LABELS, apply_softmax=apply_softmax)
        for name, new in _mutations(items).items():
            changed = list(items)
            changed[MUTATED] = new
            got = score_ids(eng, query, changed, LABELS, apply_softmax=apply_softmax)
            record(f"isolation, {mode_name(mode, attention)}", np.abs(got[keep] - base[keep]).max())
            assert np.abs(got[keep] - base[keep]).max() == 0.0, name
            assert not np.array_equal(got[MUTATED], base[MUTATED]), name


@pytest.mark.parametrize(("mode", "attention"), [("packed", "dense"), ("prefix", "pallas")])
def test_dense_baseline_and_pallas_isolation_within_float32(engine, record, mode, attention):
    """The dense baseline sums each row over every key of the stream in key order, and the
    Pallas kernel a block's own keys in key order, so when an item changes length the others'
    keys move among the zeros and sums may round differently (the XLA kernel sums them in
    relative order): within float32 rounding of the exact modes, not bit-identical."""
    eng = engine("qwen3", mode, attention)
    query, items = random_request(seed=31)
    base = np.log(score_ids(eng, query, items, LABELS))
    items[MUTATED] = items[MUTATED] + [3] * 30
    got = np.log(score_ids(eng, query, items, LABELS))
    keep = np.arange(len(items)) != MUTATED
    record(
        f"isolation, {mode_name(mode, attention)}, one item 30 tokens longer (log)",
        np.abs(got[keep] - base[keep]).max(),
    )
    assert np.abs(got[keep] - base[keep]).max() <= 1e-5


def test_a_leaky_mask_is_detected(engine):
    """The isolation and equivalence checks have teeth: letting each item also see the item
    before it in its block (its local keys start where that one starts) moves scores far
    beyond 1e-4."""
    eng = engine("qwen3", "packed")
    query, items = random_request(seed=32, n_items=8, max_item=8)
    chunk = Chunk(tuple(query), tuple(map(tuple, items)), tuple(LABELS))
    c = eng.config
    (f,) = plan(
        [chunk],
        c.mode,
        block=c.block,
        tile=c.tile,
        max_blocks=c.max_blocks,
        max_labels=c.max_labels,
    ).forwards
    leaky = f.local_start.copy()
    items_mask = f.pos >= len(query)
    for b in range(len(f.tokens) // c.block):
        rows = slice(b * c.block, (b + 1) * c.block)
        starts = sorted(set(f.local_start[rows][items_mask[rows]].tolist()))
        for prev, cur in zip(starts, starts[1:], strict=False):
            leaky[rows][(f.local_start[rows] == cur) & items_mask[rows]] = prev
    assert (leaky != f.local_start).any()
    ok, *_ = eng._run(f)
    bad, *_ = eng._run(dataclasses.replace(f, local_start=leaky))
    assert np.abs(ok - bad)[1:].max() > 1e-2
