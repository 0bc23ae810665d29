"""Sliding-window attention (Mistral's `sliding_window`, Gemma 2/3's sliding layers): a token at
position p of `query ++ item` sees keys p-W+1..p of that sequence only. The mask by hand, the
kernels against the reference, and every mode against HF transformers with queries several
times longer than the window (float32, and float64 for long queries)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

from mis_kernels.block_attention import (
    block_attention,
    block_attention_reference,
    dense_attention,
    visible,
)
from mis_kernels.ragged_attention import ragged_block_attention
from models.config import PRESETS
from models.engine import EngineConfig, ScoringEngine, score_ids
from tests.conftest import LABELS, MODES, TEST_ENGINE, hf_reference, mode_name, random_request
from tests.hf_families import write_with_transformers
from tests.test_block_attention import HAND, random_case

WINDOW = 24
# Mistral: every layer windowed; Gemma 2: every other layer, soft-caps; Gemma 3: 3 of 4
# layers, their own RoPE base.
WINDOWED = {
    name: dataclasses.replace(PRESETS[preset], sliding_window=WINDOW)
    for name, preset in (
        ("mistral", "mistral-tiny"),
        ("gemma2", "gemma2-tiny"),
        ("gemma3", "gemma3-tiny"),
    )
}


def test_mask_by_hand():
    """The layout of test_block_attention.test_mask_by_hand (a query run q0 q1 with a long item
    A and an item B after it, item C of a cached query c0..c2, a causal run r0..r2), window 2: a
    token sees itself and the token before it in its own sequence (`query ++ item`, or the
    run), nothing older."""
    got = np.asarray(visible(HAND, block=2, pool_size=3, window=2)).astype(int)
    expected = np.array(
        [
            # c0 c1 c2|q0 q1 A0 A1 A2 B0 r0 D0 C0 C1 s0 s1 s2 __ __ __
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q0 (position 0)
            [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q1
            [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A0 (2): q1, itself
            [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A1 (3): A0, itself
            [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A2 (4): A1 (own range)
            [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # B0 (2): q1, itself
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # r0 (0)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # D0 (1): r0, itself
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # C0 (3): c2, itself
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],  # C1 (4): C0, itself
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # s0 (0)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # s1 (1)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # s2 (2): s1 (own range)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],  # padding (position 0)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # padding
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],  # padding: 2 stream steps
        ]
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("seed", "window"), [(0, 1), (1, 5), (2, 16), (3, 50)])
def test_kernels_match_reference(seed, window, record):
    """The XLA block attention, the Pallas kernel (TPU and GPU lowerings in interpret mode)
    and the dense baseline against the reference, windowed."""
    c = random_case(seed)  # the planner's layout, with the tokens' positions
    w = np.int32(window)
    shape = {"block": c.block, "window": w}
    with jax.default_matmul_precision("highest"):
        want = np.asarray(block_attention_reference(*c.arrays, **shape))
        got = {
            "xla": block_attention(*c.arrays, tile=c.tile, key_tiles=(16, 8), **shape),
            **{
                f"pallas-{b}": ragged_block_attention(
                    *c.arrays,
                    block=c.block,
                    backend=b,
                    interpret=True,
                    window=w,
                )
                for b in ("tpu", "gpu")
            },
        }
        # The TPU interpreter's callbacks may still run after its output is ready: let them
        # finish before anything else runs on the CPU devices (else the next eager op can
        # deadlock with them).
        jax.effects_barrier()
        packed = random_case(seed, pool=False)  # the dense baseline has no pool
        dense_want = block_attention_reference(*packed.arrays, **shape)
        dense = dense_attention(packed.q, packed.k, packed.v, packed.meta, **shape)
    for name, out in got.items():
        diff = float(np.abs(np.asarray(out) - want).max())
        record(f"windows: {name} attention vs reference", diff)
        assert diff <= 1e-5, name
    assert float(np.abs(np.asarray(dense) - np.asarray(dense_want)).max()) <= 1e-5
    unwindowed = block_attention_reference(*c.arrays, block=c.block)
    if window < 50:  # the window changes the answer: the test has teeth
        assert np.abs(np.asarray(unwindowed) - want).max() > 1e-2


@pytest.fixture(scope="module")
def win_ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("windows")
    return {
        name: write_with_transformers(cfg, root / name, seed=seed)
        for seed, (name, cfg) in enumerate(WINDOWED.items(), 100)
    }


_ENGINES: dict[tuple, ScoringEngine] = {}


@pytest.fixture(scope="module")
def engine(win_ckpts):
    def get(name: str, mode: str = "prefix", attention: str = "auto", **settings):
        config = TEST_ENGINE | {"mode": mode, "attention": attention} | settings
        key = (name, tuple(sorted(config.items())))
        if key not in _ENGINES:
            _ENGINES[key] = ScoringEngine(win_ckpts[name], EngineConfig(**config))
        return _ENGINES[key]

    return get


def _scores(eng, query, items):
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    return soft, np.log(score_ids(eng, query, items, LABELS))


def _request(seed: int, n_items: int = 10, q_len: int = 4 * WINDOW + 7):
    """A query 4x the window, items of 1..40 tokens (some longer than the window)."""
    return random_request(seed=seed, n_items=n_items, q_len=q_len, max_item=40)


@pytest.mark.parametrize(
    ("name", "mode", "attention"),
    # Mistral (every layer sliding) in serial and prefix; the Gemmas (sliding and full
    # layers, soft-caps) in every mode.
    [(name, *m) for name in WINDOWED for m in MODES if name != "mistral" or m[0] != "packed"]
    + [("gemma2", "prefix", "pallas")],
)
def test_parity_every_mode(win_ckpts, engine, record, name, mode, attention):
    query, items = _request(seed=50)
    ref_soft, ref_logp = hf_reference(win_ckpts[name], query, items, LABELS)
    soft, logp = _scores(engine(name, mode, attention), query, items)
    label = f"{name} {mode_name(mode, attention)}"
    record(f"windows: parity vs HF, softmax, {label}", np.abs(soft - ref_soft).max())
    record(f"windows: parity vs HF, log-prob, {label}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3
    serial_soft, serial_logp = _scores(engine(name, "serial"), query, items)
    assert np.abs(soft - serial_soft).max() <= 1e-5
    assert np.abs(logp - serial_logp).max() <= 1e-4


def test_the_window_matters(win_ckpts, engine):
    """Teeth: the same weights without the window score far from HF's windowed scores."""
    query, items = _request(seed=51, n_items=4)
    _, ref_logp = hf_reference(win_ckpts["mistral"], query, items, LABELS)
    eng = ScoringEngine(win_ckpts["mistral"], EngineConfig(**TEST_ENGINE))
    eng.run_cfg = dataclasses.replace(eng.run_cfg, sliding_window=None)
    logp = np.log(score_ids(eng, query, items, LABELS))
    assert np.abs(logp - ref_logp).max() > 1e-2


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_tensor_parallel(win_ckpts, engine):
    query, items = _request(seed=52, n_items=6)
    ref_soft, ref_logp = hf_reference(win_ckpts["gemma3"], query, items, LABELS)
    soft, logp = _scores(engine("gemma3", "prefix", tp_size=2), query, items)
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.parametrize(("name", "mode"), [("mistral", "packed"), ("gemma3", "prefix")])
def test_isolation_bit_exact(engine, record, name, mode):
    eng = engine(name, mode)
    query, items = _request(seed=53, n_items=12)
    keep = np.arange(len(items)) != 3
    base = score_ids(eng, query, items, LABELS)
    for new in (items[3] + [9] * 30, items[3][:1], [7] * len(items[3])):
        changed = list(items)
        changed[3] = new
        got = score_ids(eng, query, changed, LABELS)
        record(f"windows: isolation, {name} {mode}", np.abs(got[keep] - base[keep]).max())
        assert np.abs(got[keep] - base[keep]).max() == 0.0


def _hf_float64(path: str, query, items) -> np.ndarray:
    """HF in float64, one full forward of `query ++ item` per item: softmax over the labels."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([list(query) + list(it)])
            logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
            out.append(torch.softmax(logits[LABELS], -1).numpy())
    return np.array(out)


@pytest.mark.parametrize("name", list(WINDOWED))
def test_long_query_every_mode_near_float64(win_ckpts, engine, record, name):
    """A 480-token query (20 windows): every mode's softmax scores within 1e-5 of HF in
    float64 and within 3x serial's own float32 error."""
    query, items = random_request(seed=54, n_items=12, q_len=20 * WINDOW, max_item=40)
    ref = _hf_float64(win_ckpts[name], query, items)
    err = {}
    for mode, attention in MODES:
        got = score_ids(engine(name, mode, attention), query, items, LABELS, apply_softmax=True)
        err[mode_name(mode, attention)] = float(np.abs(got - ref).max())
        record(f"windows: long query (480) vs HF float64, {name} {mode_name(mode, attention)}",
               err[mode_name(mode, attention)])  # fmt: skip
    for mode, e in err.items():
        assert e <= 1e-5, (mode, err)
        assert e <= 3 * err["serial"] + 1e-7, (mode, err)
    assert np.ptp(ref[:, 0]) > 1e-2


@pytest.mark.parametrize(("name", "pattern"), [("gemma3", 2), ("gemma2", 3)])
def test_configs_without_layer_types(win_ckpts, tmp_path, name, pattern):
    """A config written before transformers had `layer_types` gives `sliding_window_pattern`
    instead: Gemma 3 makes every pattern-th layer global (here 2, where the checkpoint's own
    layer_types say 3 of 4 are sliding), Gemma 2 ignores it (every other layer). Scored as
    transformers scores the same directory."""
    import json
    import shutil

    from transformers import AutoConfig

    path = tmp_path / name
    shutil.copytree(win_ckpts[name], path)
    config = json.loads((path / "config.json").read_text())
    del config["layer_types"]
    config["sliding_window_pattern"] = pattern
    (path / "config.json").write_text(json.dumps(config))
    eng = ScoringEngine(path, EngineConfig(**TEST_ENGINE))
    assert list(eng.cfg.layer_types) == AutoConfig.from_pretrained(path).layer_types
    assert eng.cfg.layer_types != WINDOWED[name].layer_types or name == "gemma2"
    query, items = _request(seed=53, n_items=6)
    ref_soft, ref_logp = hf_reference(str(path), query, items, LABELS)
    soft, logp = _scores(eng, query, items)
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3
