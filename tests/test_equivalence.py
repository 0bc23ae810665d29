"""Every multi-item mode returns the scores of serial `query ++ item` scoring."""

from __future__ import annotations

import numpy as np
import pytest

from mis_api.schema import ScoreRequest
from mis_api.scoring import tokenize_request
from models.engine import score_ids
from tests.conftest import LABELS, MODES, mode_name, random_request


def scores(eng, query, items, **kw):
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True, **kw)
    logp = np.log(score_ids(eng, query, items, LABELS, apply_softmax=False, **kw))
    return soft, logp


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
@pytest.mark.parametrize(("mode", "attention"), MODES[1:])
def test_multi_item_equals_serial(engine, record, name, mode, attention):
    query, items = random_request(seed=20, n_items=40, max_item=60)
    ref_soft, ref_logp = scores(engine(name, "serial"), query, items)
    soft, logp = scores(engine(name, mode, attention), query, items)
    label = mode_name(mode, attention)
    record(f"equivalence vs serial, softmax, {label}", np.abs(soft - ref_soft).max())
    record(f"equivalence vs serial, log-prob, {label}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-5
    assert np.abs(logp - ref_logp).max() <= 1e-4


def test_long_query_and_single_item(engine):
    """A query spanning several blocks, one item, every mode agrees."""
    query, items = random_request(seed=22, n_items=1, q_len=300)
    ref_soft, ref_logp = scores(engine("qwen3", "serial"), query, items)
    for mode, attention in MODES[1:]:
        soft, logp = scores(engine("qwen3", mode, attention), query, items)
        assert np.abs(soft - ref_soft).max() <= 1e-5
        assert np.abs(logp - ref_logp).max() <= 1e-4


def test_item_first_same_in_every_mode(engine):
    """`item ++ query` runs serially in every mode: bit-identical where the mode runs the same
    programs (packed: serial's), within the equivalence bound where they differ (prefix: its
    programs read a KV pool of another size, compiled differently in the last bits; dense:
    another attention)."""
    query, items = random_request(seed=23, n_items=6)
    ref = np.log(score_ids(engine("qwen3", "serial"), query, items, LABELS, item_first=True))
    for mode, attention in MODES[1:]:
        eng = engine("qwen3", mode, attention)
        got = np.log(score_ids(eng, query, items, LABELS, item_first=True))
        if (mode, attention) == ("packed", "auto"):
            np.testing.assert_array_equal(got, ref)
        assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize(("mode", "attention"), MODES)
def test_text_equals_token_ids(engine, tokenizer, mode, attention):
    eng, tok = engine("qwen3", mode, attention), tokenizer("qwen3")
    query = "Which laptop is best for long flights?"
    items = ["A 1.1 kg ultrabook with 14 hours of battery.", "A gaming laptop, 3 kg.", "Yes"]
    text = ScoreRequest(query=query, items=items, label_token_ids=LABELS, apply_softmax=True)
    q_ids, i_ids = tokenize_request(text, tok)
    assert q_ids == tok.encode(query) and i_ids == [tok.encode(it) for it in items]
    ids = ScoreRequest(query=q_ids, items=i_ids, label_token_ids=LABELS, apply_softmax=True)
    assert tokenize_request(ids, None) == (q_ids, i_ids)
    a = score_ids(eng, q_ids, i_ids, LABELS, apply_softmax=True)
    b = score_ids(eng, *tokenize_request(ids, None), LABELS, apply_softmax=True)
    np.testing.assert_array_equal(a, b)


def test_tokenizer_is_real_qwen3(tokenizer):
    tok = tokenizer("qwen3")
    assert tok.encode("Yes") == [9454]
    assert tok.encode("No") == [2753]


def test_softmax_rows_sum_to_one_and_full_vocab_is_a_probability(engine):
    query, items = random_request(seed=24, n_items=5)
    eng = engine("qwen3")
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    full = score_ids(eng, query, items, LABELS)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-12)
    assert (full > 0).all() and (full.sum(axis=1) < 1).all()


def test_empty_items_give_empty_scores(engine):
    out = score_ids(engine("qwen3"), [1, 2, 3], [], LABELS)
    assert out.shape == (0, len(LABELS))
