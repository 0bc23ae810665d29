"""Tensor parallel engines (tp_size 2 and 4 over simulated CPU devices) score like tp_size 1."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from models.checkpoint import random_hf_state, save_hf_checkpoint
from models.config import PRESETS, check_tp_size
from models.engine import EngineConfig, ScoringEngine, score_ids
from tests.conftest import LABELS, TEST_ENGINE, TP_DEVICES, random_request

pytestmark = pytest.mark.skipif(
    jax.device_count() < TP_DEVICES, reason=f"needs {TP_DEVICES} (simulated) devices"
)

# name -> (preset, heads, kv heads): GQA with kv < tp (2 kv heads over 4 devices, the case
# sglang-jax's kernel crashed on) and kv == tp, for both families (Qwen2: q/k/v biases).
MODELS = {
    "qwen3-8q2kv": ("qwen3-tiny", 8, 2),
    "qwen3-4q4kv": ("qwen3-tiny-untied", 4, 4),
    "qwen2-8q2kv": ("qwen2-tiny", 8, 2),
}


@pytest.fixture(scope="module")
def tp_ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for i, (name, (preset, heads, kv)) in enumerate(MODELS.items()):
        base = PRESETS[preset]
        cfg = dataclasses.replace(
            base, num_heads=heads, num_kv_heads=kv, hidden_size=heads * base.head_dim
        )
        out[name] = str(
            save_hf_checkpoint(cfg, random_hf_state(cfg, 40 + i), root / name, random_weights=True)
        )
    return out


def _config(**settings) -> EngineConfig:
    return EngineConfig(**(TEST_ENGINE | settings))


def _scores(eng: ScoringEngine, query, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    probs = score_ids(eng, query, items, LABELS)
    return soft, probs, np.log(probs)


# Every mode on one head layout; the other layouts (KV heads repeated or split; qkv biases) in
# prefix mode, the one whose KV pool is split by head too: what a layout changes is the
# projections' and the pool's split, not how a mode lays out the stream.
TP_CASES = [("prefix", name) for name in MODELS] + [
    ("packed", "qwen3-8q2kv"),
    ("serial", "qwen3-8q2kv"),
]


@pytest.mark.parametrize(("mode", "name"), TP_CASES)
def test_tp_sizes_agree(tp_ckpts, record, name, mode):
    """Scores (softmax over the labels, and full-vocab probabilities) within 1e-5; the
    log-probs within 1e-6 relative (about 8 float32 ulps: the row-parallel all-reduce adds
    the partial sums in another order than one device does)."""
    query, items = random_request(seed=60, n_items=12, q_len=45, max_item=16)
    ref = _scores(ScoringEngine(tp_ckpts[name], _config(mode=mode)), query, items)
    for tp in (2, 4):
        eng = ScoringEngine(tp_ckpts[name], _config(mode=mode, tp_size=tp))
        soft, probs, logp = _scores(eng, query, items)
        diffs = {
            "softmax": np.abs(soft - ref[0]).max(),
            "probability": np.abs(probs - ref[1]).max(),
            "log-prob relative": (np.abs(logp - ref[2]) / np.abs(ref[2])).max(),
        }
        for what, d in diffs.items():
            record(f"tp={tp} vs tp=1, {what}, {mode}", d)
        assert diffs["softmax"] <= 1e-5 and diffs["probability"] <= 1e-5
        assert diffs["log-prob relative"] <= 1e-6


def test_weights_are_split_not_copied(tp_ckpts):
    """Each device holds 1/tp of the head and MLP weights; KV heads are repeated to one per
    device when the model has fewer; the compiled forward all-reduces (row-parallel sums)."""
    eng = ScoringEngine(tp_ckpts["qwen3-8q2kv"], _config(tp_size=4))
    attn = eng.params["layers"]["self_attn"]
    q = attn["q_proj"]["kernel"]  # [layers, hidden, 8 heads, head_dim]
    assert {s.data.shape[2] for s in q.addressable_shards} == {2}
    assert len({s.device for s in q.addressable_shards}) == 4
    assert eng.run_cfg.num_kv_heads == 4 and eng.cfg.num_kv_heads == 2
    k = attn["k_proj"]["kernel"]
    assert {s.data.shape[2] for s in k.addressable_shards} == {1}
    kv_full = np.asarray(k)
    np.testing.assert_array_equal(kv_full[:, :, 0], kv_full[:, :, 1])  # kv head 0, repeated
    up = eng.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert {s.data.shape[-1] for s in up.addressable_shards} == {up.shape[-1] // 4}
    pool = eng._pool_kv[0]  # [layers, kv heads, tokens, dim]: split by kv head too
    assert {s.data.shape[1] for s in pool.addressable_shards} == {1}
    assert "all-reduce" in eng._body(eng.config.block).as_text()


def test_pallas_kernel_under_tp(tp_ckpts, record):
    """The Pallas ragged kernel (TPU interpret mode on CPU) under shard_map, GQA kv < tp."""
    query, items = random_request(seed=61, n_items=6, q_len=20, max_item=12)
    path = tp_ckpts["qwen3-8q2kv"]
    ref = score_ids(ScoringEngine(path, _config()), query, items, LABELS, apply_softmax=True)
    eng = ScoringEngine(path, _config(tp_size=4, attention="pallas"))
    got = score_ids(eng, query, items, LABELS, apply_softmax=True)
    record("tp=4 pallas vs tp=1 xla, softmax", np.abs(got - ref).max())
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize(
    ("heads", "kv", "inter", "tp", "field"),
    [
        (8, 2, 128, 3, "num_attention_heads"),
        (12, 4, 128, 6, "num_key_value_heads"),
        (8, 8, 100, 8, "intermediate_size"),
    ],
)
def test_bad_tp_size_names_the_field(heads, kv, inter, tp, field):
    cfg = dataclasses.replace(
        PRESETS["qwen3-tiny"], num_heads=heads, num_kv_heads=kv, intermediate_size=inter
    )
    with pytest.raises(ValueError, match=field):
        check_tp_size(cfg, tp)


def test_more_devices_than_present(ckpts):
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        ScoringEngine(ckpts["qwen3"], _config(tp_size=64))
