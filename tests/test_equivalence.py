"""Every multi-item mode returns the scores of serial `query ++ item` scoring."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.schema import ScoreRequest
from tests.conftest import LABELS, MODES, random_request


def scores(eng, query, items, **kw):
    soft = eng.score_ids(query, items, LABELS, apply_softmax=True, **kw)
    logp = np.log(eng.score_ids(query, items, LABELS, apply_softmax=False, **kw))
    return soft, logp


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
@pytest.mark.parametrize(("mode", "mask"), MODES[1:])
def test_multi_item_equals_serial(engine, record, name, mode, mask):
    query, items = random_request(seed=20, n_items=40, max_item=60)
    ref_soft, ref_logp = scores(engine(name, "serial"), query, items)
    soft, logp = scores(engine(name, mode, mask), query, items)
    record(f"equivalence vs serial, softmax, {mode}-{mask}", np.abs(soft - ref_soft).max())
    record(f"equivalence vs serial, log-prob, {mode}-{mask}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-5
    assert np.abs(logp - ref_logp).max() <= 1e-4


def test_segment_equals_dense(engine, record):
    query, items = random_request(seed=21, n_items=30)
    dense = engine("qwen3", "packed", "dense").score_ids(query, items, LABELS, apply_softmax=True)
    seg = engine("qwen3", "packed", "segment").score_ids(query, items, LABELS, apply_softmax=True)
    record("packed segment vs dense, softmax", np.abs(dense - seg).max())
    assert np.abs(dense - seg).max() <= 1e-5


def test_long_query_and_single_item(engine):
    """A query longer than several head buckets, one item, every mode agrees."""
    query, items = random_request(seed=22, n_items=1, q_len=300)
    ref_soft, ref_logp = scores(engine("qwen3", "serial"), query, items)
    for mode, mask in MODES[1:]:
        soft, logp = scores(engine("qwen3", mode, mask), query, items)
        assert np.abs(soft - ref_soft).max() <= 1e-5
        assert np.abs(logp - ref_logp).max() <= 1e-4


def test_item_first_same_in_every_mode(engine):
    query, items = random_request(seed=23, n_items=6)
    ref = engine("qwen3", "serial").score_ids(query, items, LABELS, item_first=True)
    for mode, mask in MODES[1:]:
        got = engine("qwen3", mode, mask).score_ids(query, items, LABELS, item_first=True)
        assert np.array_equal(got, ref)


@pytest.mark.parametrize(("mode", "mask"), MODES)
def test_text_equals_token_ids(engine, mode, mask):
    eng = engine("qwen3", mode, mask)
    query = "Which laptop is best for long flights?"
    items = ["A 1.1 kg ultrabook with 14 hours of battery.", "A gaming laptop, 3 kg.", "Yes"]
    text = ScoreRequest(query=query, items=items, label_token_ids=LABELS, apply_softmax=True)
    q_ids = eng.tokenizer.encode(query)
    i_ids = [eng.tokenizer.encode(it) for it in items]
    ids = ScoreRequest(query=q_ids, items=i_ids, label_token_ids=LABELS, apply_softmax=True)
    a, b = eng.score_request(text), eng.score_request(ids)
    assert a.scores == b.scores
    assert a.usage.prompt_tokens == len(q_ids) + sum(map(len, i_ids))


def test_tokenizer_is_real_qwen3(engine):
    tok = engine("qwen3").tokenizer
    assert tok.encode("Yes") == [9454]
    assert tok.encode("No") == [2753]


def test_softmax_rows_sum_to_one_and_full_vocab_is_a_probability(engine):
    query, items = random_request(seed=24, n_items=5)
    eng = engine("qwen3")
    soft = eng.score_ids(query, items, LABELS, apply_softmax=True)
    full = eng.score_ids(query, items, LABELS)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-12)
    assert (full > 0).all() and (full.sum(axis=1) < 1).all()


def test_empty_items_give_empty_scores(engine):
    out = engine("qwen3").score_ids([1, 2, 3], [], LABELS)
    assert out.shape == (0, len(LABELS))
