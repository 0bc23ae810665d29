"""Parity with HF transformers' PyTorch Qwen3/Qwen2ForCausalLM on the same checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import LABELS, MODES, hf_reference, random_request


@pytest.mark.parametrize("name", ["qwen3", "qwen3-untied", "qwen2"])
@pytest.mark.parametrize(("mode", "mask"), MODES)
def test_parity_float32(ckpts, engine, record, name, mode, mask):
    query, items = random_request(seed=10)
    ref_soft, ref_logp = hf_reference(ckpts[name], query, items, LABELS)
    eng = engine(name, mode, mask)
    soft = eng.score_ids(query, items, LABELS, apply_softmax=True)
    logp = np.log(eng.score_ids(query, items, LABELS, apply_softmax=False))
    record(f"parity vs HF, softmax, {mode}-{mask}", np.abs(soft - ref_soft).max())
    record(f"parity vs HF, log-prob, {mode}-{mask}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3
    # The check has teeth: scores vary across items far beyond the tolerance.
    assert np.ptp(ref_logp[:, 0]) > 0.1


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_parity_item_first(ckpts, engine, name):
    query, items = random_request(seed=11, n_items=5)
    ref_soft, ref_logp = hf_reference(ckpts[name], query, items, LABELS, item_first=True)
    eng = engine(name, "prefix")
    soft = eng.score_ids(query, items, LABELS, apply_softmax=True, item_first=True)
    logp = np.log(eng.score_ids(query, items, LABELS, item_first=True))
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.parametrize(
    ("mode", "mask"), [("serial", "auto"), ("packed", "segment"), ("prefix", "auto")]
)
def test_parity_bfloat16(ckpts, engine, record, mode, mask):
    query, items = random_request(seed=12, n_items=9)
    ref_soft, _ = hf_reference(ckpts["qwen3-bf16"], query, items, LABELS, dtype=torch.bfloat16)
    soft = engine("qwen3-bf16", mode, mask).score_ids(query, items, LABELS, apply_softmax=True)
    assert engine("qwen3-bf16", mode, mask).dtype_name == "bfloat16"
    record(f"parity vs HF bf16, softmax, {mode}-{mask}", np.abs(soft - ref_soft).max())
    assert np.abs(soft - ref_soft).max() <= 2e-2
