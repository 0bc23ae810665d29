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
from tests.hf_families import peft_scores, write_adapter


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


@pytest.mark.parametrize("mode,attention", MODES, ids=[mode_name(*m) for m in MODES])
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
    # Each chunk alone (its query cached by now in prefix mode): bit for bit.
    for chunk, want in zip(_chunks(requests), mixed, strict=True):
        (alone,) = engine.score([chunk])
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
