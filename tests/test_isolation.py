"""Changing one item changes no other item's score: bit-identical, not "close"."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.segment_attention import build_dense_mask
from models.engine import _Row, slot_bucket
from tests.conftest import LABELS, MODES, random_request

MUTATED = 5


def _mutations(items):
    """Same length; longer and shorter inside the item's slot bucket; across buckets."""
    rng = np.random.default_rng(99)
    it = items[MUTATED]
    n = len(it)
    hi = slot_bucket(n)
    lo = min(m for m in range(1, n + 1) if slot_bucket(m) == hi)
    new = lambda k: rng.integers(0, 151_000, k).tolist()  # noqa: E731
    return {
        "same_length": new(n),
        "longer_same_bucket": it + new(hi - n) if hi > n else None,
        "shorter_same_bucket": it[: max(lo, n - 3)] if n > lo else None,
        "longer_other_bucket": it + new(40),
        "shorter_other_bucket": it[:1],
    }


@pytest.mark.parametrize(("mode", "mask"), MODES)
def test_other_items_bit_identical(engine, record, mode, mask):
    eng = engine("qwen3", mode, mask)
    query, items = random_request(seed=30, n_items=21)
    items[MUTATED] = items[MUTATED][:20] + [7] * max(0, 13 - len(items[MUTATED]))  # 13..20
    keep = np.arange(len(items)) != MUTATED
    for apply_softmax in (True, False):
        base = eng.score_ids(query, items, LABELS, apply_softmax=apply_softmax)
        for name, new in _mutations(items).items():
            if new is None:
                continue
            if mask == "dense" and "other_bucket" in name:
                continue  # see test_dense_mask_moves_with_buckets
            changed = list(items)
            changed[MUTATED] = new
            got = eng.score_ids(query, changed, LABELS, apply_softmax=apply_softmax)
            record(f"isolation, {mode}-{mask}", np.abs(got[keep] - base[keep]).max())
            assert np.abs(got[keep] - base[keep]).max() == 0.0, name
            assert not np.array_equal(got[MUTATED], base[MUTATED]), name


def test_dense_mask_moves_with_buckets(engine, record):
    """The dense baseline sums over every key of the stream, so when an item moves to another
    slot bucket the others' zero-padding moves too and sums may round differently; it stays
    within float32 rounding of serial."""
    eng = engine("qwen3", "packed", "dense")
    query, items = random_request(seed=31)
    base = np.log(eng.score_ids(query, items, LABELS))
    items[MUTATED] = items[MUTATED] + [3] * 40
    got = np.log(eng.score_ids(query, items, LABELS))
    keep = np.arange(len(items)) != MUTATED
    record(
        "isolation, packed-dense, item moved to another bucket (log)",
        np.abs(got[keep] - base[keep]).max(),
    )
    assert np.abs(got[keep] - base[keep]).max() <= 1e-5


def test_a_leaky_mask_is_detected(engine):
    """The equivalence bounds have teeth: letting item tokens also see the previous slot
    moves scores far beyond 1e-4 in log space."""
    eng = engine("qwen3", "packed", "dense")
    query, items = random_request(seed=32, n_items=8, max_item=8)
    row = _Row(query, items, 8, LABELS, None, (0, list(range(8))))
    batch = eng._pack_rows([row], slots=8, slot_len=8, head=64, labels=4)
    mask = build_dense_mask(
        batch.pos, batch.item_off, batch.prefix_len, head_len=batch.layout.head_len, slot_len=8
    )
    leaky = mask.copy()
    h = batch.layout.head_len
    for t in range(h + 8, batch.layout.length):
        if batch.item_off[0, t] >= 0:
            leaky[0, t, t - 8] = True  # same offset in the previous item
    fn = eng._fn(batch.layout)
    args = (eng.params, batch.tokens, batch.pos, batch.item_off, batch.prefix_len, None)
    ok = fn(*args, mask, batch.score_idx, batch.label_ids)[0]
    bad = fn(*args, leaky, batch.score_idx, batch.label_ids)[0]
    assert np.abs(np.asarray(ok) - np.asarray(bad))[0, 1:8].max() > 1e-2
