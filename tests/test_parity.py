"""Parity with HF transformers' PyTorch Qwen3/Qwen2ForCausalLM on the same checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.engine import score_ids
from tests.conftest import LABELS, MODES, hf_reference, mode_name, random_request


@pytest.mark.parametrize("name", ["qwen3", "qwen3-untied", "qwen2"])
@pytest.mark.parametrize(("mode", "attention"), MODES)
def test_parity_float32(ckpts, engine, record, name, mode, attention):
    query, items = random_request(seed=10)
    ref_soft, ref_logp = hf_reference(ckpts[name], query, items, LABELS)
    eng = engine(name, mode, attention)
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    logp = np.log(score_ids(eng, query, items, LABELS, apply_softmax=False))
    label = mode_name(mode, attention)
    record(f"parity vs HF, softmax, {label}", np.abs(soft - ref_soft).max())
    record(f"parity vs HF, log-prob, {label}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3
    # The check has teeth: scores vary across items far beyond the tolerance.
    assert np.ptp(ref_logp[:, 0]) > 0.1


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_parity_item_first(ckpts, engine, name):
    query, items = random_request(seed=11, n_items=5)
    ref_soft, ref_logp = hf_reference(ckpts[name], query, items, LABELS, item_first=True)
    eng = engine(name, "prefix")
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True, item_first=True)
    logp = np.log(score_ids(eng, query, items, LABELS, item_first=True))
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.parametrize("mode", ["serial", "packed", "prefix"])
def test_parity_bfloat16(ckpts, engine, record, mode):
    query, items = random_request(seed=12, n_items=9)
    ref_soft, _ = hf_reference(ckpts["qwen3-bf16"], query, items, LABELS, dtype=torch.bfloat16)
    eng = engine("qwen3-bf16", mode)
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    assert eng.dtype_name == "bfloat16"
    record(f"parity vs HF bf16, softmax, {mode}", np.abs(soft - ref_soft).max())
    assert np.abs(soft - ref_soft).max() <= 2e-2
