"""Bad requests get clear errors naming the field; nothing is half-scored."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mis_api.schema import ScoreRequest, validation_message
from mis_score.cli import OfflineScorer
from models.inputs import Chunk, ScoringInputError

OK = {"query": [1, 2], "items": [[3], [4, 5]], "label_token_ids": [9454, 2753]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"items": [[1], "text"]}, "items"),  # mixed item kinds
        ({"query": "text"}, "items[0]"),  # text query with id items
        ({"query": ""}, "query"),
        ({"query": []}, "query"),
        ({"items": [[1], []]}, "items[1]"),
        ({"label_token_ids": [5, 5]}, "label_token_ids"),
        ({"label_token_ids": ["5"]}, "label_token_ids"),
        ({"label_token_ids": [1.5]}, "label_token_ids"),
        ({"query": 5}, "query"),
        ({"items": 5}, "items"),
        ({"items": [["a"]]}, "items"),
        ({"apply_softmax": "yes"}, "apply_softmax"),
        ({"item_first": 1}, "item_first"),
        ({"unknown": 1}, "unknown"),
        ({"items": None}, "items"),
    ],
)
def test_schema_rejects(change, field):
    with pytest.raises(ValidationError) as err:
        ScoreRequest.model_validate(OK | change)
    assert field in validation_message(err.value)


def test_missing_fields_are_named(engine):
    with pytest.raises(ValidationError) as err:
        ScoreRequest.model_validate({"query": [1]})
    assert "items" in validation_message(err.value)
    # Label ids depend on the model's head (a classification model takes none): the request
    # layer refuses a causal LM request without them.
    scorer = OfflineScorer(engine("qwen3"), "m", max_items=100)
    for labels in ({}, {"label_token_ids": []}):
        err = scorer.score_line(json.dumps({"query": [1], "items": [[2]]} | labels))
        assert err["code"] == 400 and err["message"] == "label_token_ids: must not be empty"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"label_token_ids": [151936]}, "label_token_ids"),  # == vocab size
        ({"label_token_ids": [-1]}, "label_token_ids"),
        ({"query": [1, -5]}, "query"),
        ({"items": [[1], [2**40]]}, "items[1]"),
    ],
)
def test_ids_outside_vocab_are_refused_by_the_request_layer_and_the_engine(
    engine, ckpts, change, field
):
    body = OK | change
    scorer = OfflineScorer(engine("qwen3"), "m", max_items=100)
    err = scorer.score_line(json.dumps(body))
    assert err["code"] == 400 and err["message"].startswith(field)
    # The engine checks its own input too: a bad chunk errs, the good one beside it scores.
    bad = Chunk(
        tuple(body["query"]), tuple(map(tuple, body["items"])), tuple(body["label_token_ids"])
    )
    good = Chunk((1, 2), ((3,),), (9454,))
    got_bad, got_good = engine("qwen3").score([bad, good])
    assert isinstance(got_bad, ScoringInputError) and str(got_bad).startswith(field)
    assert got_good.shape == (1, 1)


def test_single_string_item_and_empty_list(engine):
    scorer = OfflineScorer(engine("qwen3"), "m", max_items=100)
    one = scorer.score_line(
        json.dumps({"query": "q", "items": "an item", "label_token_ids": [1, 2]})
    )
    assert len(one["scores"]) == 1 and len(one["scores"][0]) == 2
    none = scorer.score_line(json.dumps({"query": "q", "items": [], "label_token_ids": [1]}))
    assert none["scores"] == []
