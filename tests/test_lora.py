"""LoRA adapters in the engine: each chunk scored with its own adapter, in shared forwards, equal
to transformers + peft (adapters unmerged) on checkpoints and adapters they wrote; a chunk's
scores bit-identical whichever adapters' chunks it was batched with; the base's own scores
unchanged by a bit when adapters are loaded; a query's cached K/V never served to another
adapter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.engine import ScoringEngine
from models.engine_config import EngineConfig
from models.inputs import Chunk, UnknownAdapter
from tests.conftest import LABELS, MODES, TEST_ENGINE, mode_name
from tests.hf_families import (
    peft_class_logits,
    peft_scores,
    write_adapter,
    write_cls_adapter,
    write_with_transformers,
)


@pytest.fixture(scope="module")
def adapters(ckpts, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    base = ckpts["qwen3"]
    return {
        "a": write_adapter(base, root / "a", seed=1),
        # rsLoRA, another rank for the MLP (rank_pattern) and alpha for v_proj (alpha_pattern).
        "b": write_adapter(
            base,
            root / "b",
            seed=2,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"mlp.up_proj": 12},
            alpha_pattern={"v_proj": 3},
        ),
        # Attention only, a regex reaching the first layer alone.
        "c": write_adapter(
            base, root / "c", seed=3, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"
        ),
    }


def _requests(seed: int = 0):
    """(adapter, query, items): the same query under the base and two adapters (so the prefix
    pool holds it three times), another query under a third."""
    rng = np.random.default_rng(seed)
    ids = lambda n: tuple(rng.integers(1, 150_000, int(n)).tolist())  # noqa: E731
    shared, other = ids(70), ids(23)
    items = lambda n: tuple(ids(rng.integers(1, 40)) for _ in range(n))  # noqa: E731
    return [(None, shared, items(5)), ("a", shared, items(6)), ("b", shared, items(4)),
            ("c", other, items(5)), ("a", other, items(3))]  # fmt: skip


def _chunks(requests) -> list[Chunk]:
    return [Chunk(q, its, tuple(LABELS), False, adapter=a) for a, q, its in requests]


@pytest.fixture(scope="module")
def references(ckpts, adapters):
    out = {}
    for adapter, query, items in _requests():
        path = None if adapter is None else adapters[adapter]
        out[adapter, query] = peft_scores(ckpts["qwen3"], path, query, items, LABELS)
    return out


# Every mode, and the Pallas kernel (interpret mode here) in prefix mode: the LoRA term sits in
# the projections, whichever attention runs between them.
LORA_MODES = [*MODES, ("prefix", "pallas")]


@pytest.mark.parametrize("mode,attention", LORA_MODES, ids=[mode_name(*m) for m in LORA_MODES])
def test_mixed_adapters_equal_peft_and_their_chunks_alone(
    ckpts, adapters, references, mode, attention
):
    config = EngineConfig(mode=mode, attention=attention, max_adapters=3, **TEST_ENGINE)
    engine = ScoringEngine(ckpts["qwen3"], config, adapters)
    requests = _requests()
    mixed = engine.score(_chunks(requests))
    for (adapter, query, _), got in zip(requests, mixed, strict=True):
        soft, logp = references[adapter, query]
        np.testing.assert_allclose(np.log(got), logp, atol=1e-3, err_msg=str(adapter))
        np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), soft, atol=1e-4)
    # Each chunk alone (its query cached by now in prefix mode): bit for bit, but for the Pallas
    # kernel, whose last bits follow an item's offset in its block (tests/test_isolation.py).
    for chunk, want in zip(_chunks(requests), mixed, strict=True):
        (alone,) = engine.score([chunk])
        if attention == "pallas":
            np.testing.assert_allclose(np.log(alone), np.log(want), atol=1e-5, rtol=0)
        else:
            assert np.array_equal(alone, want), chunk.adapter


def test_the_base_is_unchanged_by_adapters_and_one_slot_serves_them_all(
    ckpts, adapters, references
):
    """Base chunks bit-identical to an engine with no adapters (its programs have no LoRA
    term); with one device slot for three adapters the call is split and each adapter loaded
    in turn, every chunk still equal to peft's; an unknown adapter fails its own chunk."""
    requests = _requests()
    base = [i for i, (a, _, _) in enumerate(requests) if a is None]
    plain = ScoringEngine(ckpts["qwen3"], EngineConfig(**TEST_ENGINE))
    want = plain.score([_chunks(requests)[i] for i in base])
    engine = ScoringEngine(ckpts["qwen3"], EngineConfig(max_adapters=1, **TEST_ENGINE), adapters)
    unknown = Chunk((5, 6), ((7,),), tuple(LABELS), adapter="x")
    out = engine.score([*_chunks(requests), unknown])
    assert isinstance(out[-1], UnknownAdapter), out[-1]
    assert "'x'" in str(out[-1]) and "['a', 'b', 'c']" in str(out[-1])
    for i, w in zip(base, want, strict=True):
        assert np.array_equal(out[i], w)
    for (adapter, query, _), got in zip(requests, out, strict=False):
        np.testing.assert_allclose(np.log(got), references[adapter, query][1], atol=1e-3)
    assert len(engine.adapter_slots.resident()) == 1


def test_a_failed_load_leaves_no_adapter_in_a_slot_it_did_not_fill(ckpts, adapters, monkeypatch):
    """Two slots holding a and b; a call needing c and d plans c into one slot and d into the
    other, and c's load fails: d was never loaded, so b's weights (still in its slot) must
    not be taken for d's. The next call loads d and scores it with d's weights."""
    config = EngineConfig(mode="prefix", max_adapters=2, **TEST_ENGINE)
    engine = ScoringEngine(ckpts["qwen3"], config, {**adapters, "d": adapters["a"]})
    requests = _requests()
    chunk = {a: c for a, c in zip([r[0] for r in requests], _chunks(requests), strict=True)}
    engine.score([chunk["a"], chunk["b"]])
    real = ScoringEngine._load_slot

    def failing(self, name, slot):
        if name == "c":
            raise MemoryError("device out of memory")
        return real(self, name, slot)

    monkeypatch.setattr(ScoringEngine, "_load_slot", failing)
    d_chunk = dataclasses.replace(chunk["b"], adapter="d")
    with pytest.raises(MemoryError):
        engine.score([chunk["c"], d_chunk])
    monkeypatch.setattr(ScoringEngine, "_load_slot", real)
    (got,) = engine.score([d_chunk])
    (as_a,) = engine.score([dataclasses.replace(d_chunk, adapter="a")])
    assert np.array_equal(got, as_a)  # d is a's adapter under another name


def test_a_removed_or_replaced_adapter_frees_the_queries_cached_under_it(ckpts, adapters):
    """Prefix mode: an adapter removed, or replaced under its name, leaves the prefix pool at
    once with the queries cached under it (no later call could read them), the others stay;
    the replaced name scores with its new weights."""
    config = EngineConfig(mode="prefix", max_adapters=2, **TEST_ENGINE)
    engine = ScoringEngine(ckpts["qwen3"], config, adapters)
    requests = _requests()
    engine.score(_chunks(requests))
    key = {n: engine.adapter_slots.key(n) for n in adapters}
    shared, other = requests[0][1], requests[3][1]
    cached = {shared, (key["a"], shared), (key["b"], shared), (key["c"], other), (key["a"], other)}
    assert set(engine.pool.cached()) == cached
    engine.remove_adapter("b")
    assert set(engine.pool.cached()) == cached - {(key["b"], shared)}
    engine.add_adapter("a", adapters["c"])
    assert set(engine.pool.cached()) == {shared, (key["c"], other)}
    as_a, as_c = (dataclasses.replace(_chunks(requests)[4], adapter=n) for n in "ac")
    (got,) = engine.score([as_a])
    assert np.array_equal(got, engine.score([as_c])[0])  # a now holds c's weights


def test_tensor_parallel_with_adapters(ckpts, adapters, references):
    """tp_size 2 (the adapters' slots replicated, the projections split): within the parity
    bounds of peft, as tp 1 is."""
    config = EngineConfig(mode="prefix", tp_size=2, max_adapters=3, **TEST_ENGINE)
    engine = ScoringEngine(ckpts["qwen3"], config, adapters)
    requests = _requests()
    for (adapter, query, _), got in zip(requests, engine.score(_chunks(requests)), strict=True):
        soft, logp = references[adapter, query]
        np.testing.assert_allclose(np.log(got), logp, atol=1e-3, err_msg=str(adapter))
        np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), soft, atol=1e-4)


@pytest.mark.parametrize("family", ["llama3-tiny", "gemma2-tiny"])
def test_adapters_on_other_families_equal_peft(family, tmp_path):
    """Llama 3 (an untied LM head, scaled RoPE) and Gemma 2 (soft-capped attention and logits,
    sliding windows, GeGLU, scaled embeddings, norms of 1 + w): an adapter on every projection
    and one on two, mixed with the base in one call, each within the bounds of transformers +
    peft, and bit-identical alone."""
    base = write_with_transformers(family, tmp_path / "base", seed=50)
    adapters = {
        "all": write_adapter(base, tmp_path / "all", seed=51),
        "two": write_adapter(
            base, tmp_path / "two", seed=52, r=4, target_modules=["k_proj", "up_proj"]
        ),
    }
    config = EngineConfig(mode="prefix", max_adapters=2, **TEST_ENGINE)
    engine = ScoringEngine(base, config, adapters)
    rng = np.random.default_rng(8)
    ids = lambda n: tuple(rng.integers(1, 150_000, int(n)).tolist())  # noqa: E731
    query = ids(40)
    requests = [(a, tuple(ids(rng.integers(2, 30)) for _ in range(4))) for a in
                (None, "all", "two")]  # fmt: skip
    chunks = [Chunk(query, items, tuple(LABELS), False, adapter=a) for a, items in requests]
    mixed = engine.score(chunks)
    for (adapter, items), got in zip(requests, mixed, strict=True):
        soft, logp = peft_scores(base, adapters.get(adapter), query, items, LABELS)
        np.testing.assert_allclose(np.log(got), logp, atol=1e-3, err_msg=str(adapter))
        np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), soft, atol=1e-4)
    for chunk, want in zip(chunks, mixed, strict=True):
        (alone,) = engine.score([chunk])
        assert np.array_equal(alone, want), chunk.adapter
    # The adapters matter: each moves the scores of the same query and items.
    (as_all,) = engine.score([dataclasses.replace(chunks[0], adapter="all")])
    assert np.abs(np.log(as_all) - np.log(mixed[0])).max() > 0.1


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A 3-class Qwen3 classifier transformers wrote, and peft adapters on it: its own head
    of 3 classes, its own head of 2, LoRA alone (the base's head)."""
    root = tmp_path_factory.mktemp("cls-adapters")
    base = write_with_transformers("qwen3-tiny-cls", root / "base", seed=40)
    seq_cls = {"task_type": "SEQ_CLS"}  # peft adds the head to modules_to_save
    return base, {
        "three": write_cls_adapter(base, root / "three", 41, r=4, **seq_cls),
        "two": write_cls_adapter(
            base, root / "two", 42, num_labels=2, target_modules=["q_proj", "down_proj"], **seq_cls
        ),
        "plain": write_cls_adapter(base, root / "plain", 43, target_modules=["v_proj"]),
    }


@pytest.mark.parametrize("mode", ["packed", "prefix"])
def test_adapters_own_classification_heads_equal_peft(classifier, mode):
    """Adapters with their own `score` head (peft's modules_to_save; 3 classes as the base, or
    2) and one without, mixed in one call with the base: each chunk's class logits equal to
    transformers + peft's, with its head's number of classes; each chunk alone bit-identical;
    the base's bit-identical to an engine without adapters."""
    base, adapters = classifier
    config = EngineConfig(mode=mode, max_adapters=2, **TEST_ENGINE)  # 3 adapters: 2 groups
    engine = ScoringEngine(base, config, adapters)
    assert engine.classes("two") == ("LABEL_0", "LABEL_1")
    assert engine.classes("three") == engine.classes() == ("negative", "neutral", "positive")
    rng = np.random.default_rng(7)
    ids = lambda n: tuple(rng.integers(1, 150_000, int(n)).tolist())  # noqa: E731
    query = ids(30)
    requests = [(a, tuple(ids(rng.integers(2, 30)) for _ in range(4))) for a in
                (None, "two", "three", "plain", "two")]  # fmt: skip
    chunks = [Chunk(query, items, (), False, adapter=a) for a, items in requests]
    mixed = engine.score(chunks)
    for (adapter, items), got in zip(requests, mixed, strict=True):
        want = peft_class_logits(base, adapters.get(adapter), query, items)
        assert got.shape == want.shape, adapter
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, (adapter, got, want)
    for chunk, want in zip(chunks, mixed, strict=True):
        (alone,) = engine.score([chunk])
        assert np.array_equal(alone, want), chunk.adapter
    plain = ScoringEngine(base, EngineConfig(mode=mode, **TEST_ENGINE))
    (without,) = plain.score([chunks[0]])
    assert np.array_equal(without, mixed[0])


def test_an_lm_turned_classifier_by_its_adapter(ckpts, adapters, references, tmp_path):
    """An adapter peft saved on the LM as a 2-class sequence classifier (SEQ_CLS: LoRA and a
    `score` head of its own) answers class logits equal to transformers + peft's, in one call
    with the LM's own chunks and an LM adapter's (those still equal to peft's label scores);
    each chunk alone bit-identical; the LM's scores bit-identical to an engine without
    adapters."""
    base = ckpts["qwen3"]
    to_cls = write_cls_adapter(base, tmp_path / "to-cls", 44, num_labels=2, task_type="SEQ_CLS")
    config = EngineConfig(mode="prefix", max_adapters=2, **TEST_ENGINE)
    engine = ScoringEngine(base, config, {"a": adapters["a"], "cls": to_cls})
    assert engine.head_of("cls") == ("classification", ("LABEL_0", "LABEL_1"))
    assert engine.head_of("a") == engine.head_of() == ("lm", ())
    lm = [r for r in _requests() if r[0] in (None, "a")]
    query, items = lm[0][1], lm[0][2]
    chunks = [*_chunks(lm), Chunk(query, items, (), False, adapter="cls")]
    mixed = engine.score(chunks)
    for (adapter, q, _), got in zip(lm, mixed, strict=False):
        soft, logp = references[adapter, q]
        np.testing.assert_allclose(np.log(got), logp, atol=1e-3, err_msg=str(adapter))
        np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), soft, atol=1e-4)
    want = peft_class_logits(base, to_cls, query, items)
    assert mixed[-1].shape == want.shape == (len(items), 2)
    assert np.abs(mixed[-1] - want).max() <= 1e-4 * np.abs(want).max(), (mixed[-1], want)
    for chunk, got in zip(chunks, mixed, strict=True):
        (alone,) = engine.score([chunk])
        assert np.array_equal(alone, got), chunk.adapter
    plain = ScoringEngine(base, EngineConfig(mode="prefix", **TEST_ENGINE))
    base_chunks = [c for c in chunks if c.adapter is None]
    for got, want in zip(plain.score(base_chunks), mixed, strict=False):
        assert np.array_equal(got, want)


def test_adapter_heads_the_engine_cannot_run_are_refused(classifier, ckpts, tmp_path):
    """A head wider than any the engine started with (its head program's width), or one on
    an LM engine that started without adapter heads, is refused naming modules_to_save."""
    base, adapters = classifier
    lm = ScoringEngine(ckpts["qwen3"], EngineConfig(max_adapters=1, **TEST_ENGINE))
    to_cls = write_cls_adapter(ckpts["qwen3"], tmp_path / "to-cls", 44, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"^modules_to_save: .* started with no adapter heads"):
        lm.add_adapter("cls", to_cls)
    engine = ScoringEngine(
        base, EngineConfig(max_adapters=1, **TEST_ENGINE), {"two": adapters["two"]}
    )
    wide = write_cls_adapter(base, tmp_path / "wide", 45, num_labels=5, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"^modules_to_save: .* 5 classes; .* up to 3 classes"):
        engine.add_adapter("wide", wide)
    assert "wide" not in engine.adapters()
