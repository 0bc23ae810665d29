"""Sequence-classification heads (`*ForSequenceClassification`, issue 25): each item's class
logits where transformers pools `query ++ item` (its last token that is not the pad token), equal
to HF transformers' on checkpoints it wrote, in every mode, isolation bit-exact, batching
bit-identical, nothing compiled after warm-up."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

from models.config import PRESETS, from_hf_config
from models.engine import EngineConfig, ScoringEngine, score_ids
from models.inputs import Chunk, ScoringInputError, check_head_labels
from tests.conftest import MODES, TEST_ENGINE, mode_name, random_request
from tests.hf_families import classes_from_logits, hf_class_logits, write_with_transformers

# name -> config: a 3-class Qwen3, a one-logit Llama 3 (a reranker's relevance logit), and a
# 2-class Gemma 2 (its final logit soft-cap is the LM head's, not the classifier's).
HEADS = {
    "qwen3-cls": PRESETS["qwen3-tiny-cls"],
    "llama3-cls": PRESETS["llama3-tiny-cls"],
    "gemma2-cls": dataclasses.replace(
        PRESETS["gemma2-tiny"], num_labels=2, class_labels=("no", "yes")
    ),
}


@pytest.fixture(scope="module")
def cls_ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cls")
    out = {
        name: write_with_transformers(cfg, root / name, seed=seed)
        for seed, (name, cfg) in enumerate(HEADS.items(), 90)
    }
    out["qwen3-cls-bf16"] = write_with_transformers(
        HEADS["qwen3-cls"], root / "bf16", seed=95, dtype="bfloat16"
    )
    return out


_ENGINES: dict[tuple, ScoringEngine] = {}


@pytest.fixture(scope="module")
def engine(cls_ckpts):
    def get(name: str, mode: str = "prefix", attention: str = "auto", **settings):
        config = TEST_ENGINE | {"mode": mode, "attention": attention} | settings
        key = (name, tuple(sorted(config.items())))
        if key not in _ENGINES:
            _ENGINES[key] = ScoringEngine(cls_ckpts[name], EngineConfig(**config))
        return _ENGINES[key]

    return get


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize(("mode", "attention"), MODES)
def test_parity_every_mode(cls_ckpts, engine, record, name, mode, attention):
    """Raw class logits within 1e-4 relative of HF's, probabilities (softmax over the classes,
    sigmoid for one) within 1e-4; every mode within 1e-5 relative of our serial logits."""
    query, items = random_request(seed=10, n_items=13)
    ref = hf_class_logits(cls_ckpts[name], query, items)
    eng = engine(name, mode, attention)
    logits = score_ids(eng, query, items, (), apply_softmax=False)
    probs = score_ids(eng, query, items, (), apply_softmax=True)
    assert logits.shape == probs.shape == (len(items), HEADS[name].num_labels)
    label = f"{name} {mode_name(mode, attention)}"
    record(f"classification: logits vs HF, relative, {label}", _relative(logits, ref))
    assert _relative(logits, ref) <= 1e-4
    assert np.abs(probs - classes_from_logits(ref, True)).max() <= 1e-4
    assert np.ptp(ref[:, 0]) > 0.1  # the check has teeth
    serial = score_ids(engine(name, "serial"), query, items, ())
    assert _relative(logits, serial) <= 1e-5


def _ending_in_pads(pad: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A request whose items end in one or several pad tokens, hold one inside, or hold only
    pads (transformers then pools the query's last token)."""
    query, items = random_request(seed=seed, n_items=10)
    tails = [1, 3, 0, 1, 2, 0, 5, 1, 0, 2]
    items = [it + [pad] * k for it, k in zip(items, tails, strict=True)]
    items[2] = [pad, *items[2]]  # a pad inside, not at the end: not a pad position
    items[4], items[7] = [pad], [pad] * 3
    return query, items


@pytest.mark.parametrize("name", ["qwen3-cls", "llama3-cls"])
@pytest.mark.parametrize(("mode", "attention"), MODES)
def test_pooling_at_the_last_token_that_is_not_pad(cls_ckpts, engine, name, mode, attention):
    """transformers' `*ForSequenceClassification` pools the last token that is not
    `pad_token_id` (many rerankers and reward models pad with eos): items ending in one or
    several pads, or holding only pads, score as HF scores them, in every mode and with
    item_first (a query ending in pads). Reading the last token instead was off by up to 2.01
    (3-class Qwen3) and 0.98 (1-class Llama) in logits."""
    pad = HEADS[name].pad_token_id
    query, items = _ending_in_pads(pad, seed=16)
    ref = hf_class_logits(cls_ckpts[name], query, items)
    got = score_ids(engine(name, mode, attention), query, items, ())
    assert _relative(got, ref) <= 1e-4
    query = [*query, pad, pad]  # item_first: `item ++ query`, pooled before the query's pads
    ref = hf_class_logits(cls_ckpts[name], query, items[:4], item_first=True)
    got = score_ids(engine(name, mode, attention), query, items[:4], (), item_first=True)
    assert _relative(got, ref) <= 1e-4


def test_pooling_without_a_pad_token_reads_the_last_token(tmp_path):
    """A checkpoint whose config has no pad_token_id: transformers (one sequence at a time)
    pools the last token, whatever it is, and so do we."""
    cfg = dataclasses.replace(HEADS["qwen3-cls"], pad_token_id=None)
    path = write_with_transformers(cfg, tmp_path / "no-pad", seed=7)
    eng = ScoringEngine(path, EngineConfig(**TEST_ENGINE))
    assert eng.cfg.pad_token_id is None
    query, items = _ending_in_pads(151643, seed=17)
    got = score_ids(eng, query, items, ())
    assert _relative(got, hf_class_logits(path, query, items)) <= 1e-4
    assert eng.cfg == dataclasses.replace(from_hf_config(cfg.to_hf_dict()), dtype=eng.cfg.dtype)


@pytest.mark.parametrize("name", ["qwen3-cls", "llama3-cls"])
def test_item_first_and_pallas(cls_ckpts, engine, name):
    query, items = random_request(seed=11, n_items=5)
    ref = hf_class_logits(cls_ckpts[name], query, items, item_first=True)
    got = score_ids(engine(name), query, items, (), item_first=True)
    assert _relative(got, ref) <= 1e-4
    ref = hf_class_logits(cls_ckpts[name], query, items)
    got = score_ids(engine(name, "prefix", "pallas"), query, items, ())
    assert _relative(got, ref) <= 1e-4


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_tensor_parallel(cls_ckpts, engine):
    query, items = random_request(seed=12, n_items=7)
    ref = hf_class_logits(cls_ckpts["qwen3-cls"], query, items)
    got = score_ids(engine("qwen3-cls", "prefix", tp_size=2), query, items, ())
    assert _relative(got, ref) <= 1e-4


@pytest.mark.parametrize("name", ["qwen3-cls", "llama3-cls"])
@pytest.mark.parametrize("mode", ["packed", "prefix"])
def test_isolation_bit_exact(engine, record, name, mode):
    eng = engine(name, mode)
    query, items = random_request(seed=30, n_items=15)
    keep = np.arange(len(items)) != 6
    for apply_softmax in (True, False):
        base = score_ids(eng, query, items, (), apply_softmax=apply_softmax)
        for new in (items[6][:-1] + [5], items[6] + [1, 2, 3] * 10, items[6][:1]):
            changed = list(items)
            changed[6] = new
            got = score_ids(eng, query, changed, (), apply_softmax=apply_softmax)
            diff = np.abs(got[keep] - base[keep]).max()
            record(f"classification: isolation, {name} {mode}", diff)
            assert diff == 0.0
            assert not np.array_equal(got[6], base[6])


def test_bfloat16(cls_ckpts, engine, record):
    query, items = random_request(seed=13, n_items=9)
    ref = hf_class_logits(cls_ckpts["qwen3-cls-bf16"], query, items, dtype=torch.bfloat16)
    eng = engine("qwen3-cls-bf16")
    assert eng.dtype_name == "bfloat16"
    probs = score_ids(eng, query, items, (), apply_softmax=True)
    diff = np.abs(probs - classes_from_logits(ref, True)).max()
    record("classification: probabilities vs HF bf16, qwen3-cls prefix", diff)
    assert diff <= 2e-2


def test_engine_api(cls_ckpts, engine):
    """What a Serve layer reads: the head kind and the class labels (id2label, in order);
    a classification chunk carries no label ids, and any it carries are not read."""
    eng = engine("qwen3-cls")
    assert eng.head_kind == "classification"
    assert eng.class_labels == ("negative", "neutral", "positive")
    assert engine("llama3-cls").class_labels == ("relevant",)
    query, items = random_request(seed=14, n_items=4)
    a, b = eng.score(
        [
            Chunk(tuple(query), tuple(map(tuple, items)), (), True),
            Chunk(tuple(query), tuple(map(tuple, items)), (0, 9454), True),
        ]
    )
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    (err,) = eng.score([Chunk((1, 10**9), ((3,),), ())])
    assert isinstance(err, ScoringInputError) and str(err).startswith("query")
    with pytest.raises(ScoringInputError, match="label_token_ids: this model has a classif"):
        check_head_labels([9454], eng.head_kind, eng.class_labels)
    check_head_labels([], eng.head_kind, eng.class_labels)
    with pytest.raises(ScoringInputError, match="label_token_ids: must not be empty"):
        check_head_labels([], "lm", ())
    one = score_ids(engine("llama3-cls"), query, items, (), apply_softmax=True)
    raw = score_ids(engine("llama3-cls"), query, items, ())
    np.testing.assert_allclose(one, 1 / (1 + np.exp(-raw)), rtol=1e-12)


def test_batching_bit_identical_and_no_compiles_after_warmup(cls_ckpts):
    from tests.test_compile import COMPILES, _random_chunks

    limits = {"max_batch_tokens": 1024, "max_item_tokens": 32, "max_query_tokens": 300}
    eng = ScoringEngine(cls_ckpts["qwen3-cls"], EngineConfig(mode="prefix", max_labels=4, **limits))
    eng.warmup()
    before = len(COMPILES)
    rng = np.random.default_rng(4)
    for _ in range(4):
        chunks = [dataclasses.replace(c, label_ids=()) for c in _random_chunks(rng, limits, 4)]
        together = eng.score(chunks)
        for c, got in zip(chunks, together, strict=True):
            assert got.shape == (len(c.items), 3)
            (alone,) = eng.score([c])
            np.testing.assert_array_equal(got, alone)
    assert len(COMPILES) == before


def test_config(cls_ckpts):
    """id2label gives the classes; an LM checkpoint has none; the head is the architecture's."""
    from models.checkpoint import read_hf_config

    cfg = from_hf_config(read_hf_config(cls_ckpts["gemma2-cls"]))
    assert cfg.head.value == "classification" and cfg.class_labels == ("no", "yes")
    assert cfg.architecture == "Gemma2ForSequenceClassification"
    assert PRESETS["qwen3-tiny"].head.value == "lm" and PRESETS["qwen3-tiny"].class_labels == ()


@pytest.mark.parametrize("preset", ["qwen2-tiny", "mistral-tiny", "gemma-tiny", "gemma3-tiny"])
def test_every_family_has_a_classification_head(tmp_path, preset):
    """The other families' `*ForSequenceClassification` (Gemma 3: Gemma3TextFor...), prefix
    mode, within 1e-4 relative of HF."""
    cfg = dataclasses.replace(PRESETS[preset], num_labels=2, class_labels=("no", "yes"))
    path = write_with_transformers(cfg, tmp_path / preset, seed=3)
    query, items = random_request(seed=15, n_items=5)
    ref = hf_class_logits(path, query, items)
    eng = ScoringEngine(path, EngineConfig(**TEST_ENGINE))
    assert eng.cfg.architecture == from_hf_config(eng.cfg.to_hf_dict()).architecture
    got = score_ids(eng, query, items, ())
    assert _relative(got, ref) <= 1e-4
