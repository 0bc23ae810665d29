"""Long queries keep float32 precision in every mode (issue 15).

RoPE turns an error in a frequency into an angle error that grows with the position, so these
tests look at positions up to the service's limits (8192 query + 512 item tokens) and at a
2000-token query scored in every mode against HF transformers in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from models.config import PRESETS
from models.decoder import rope_tables
from models.engine import score_ids
from tests.conftest import LABELS, MODES, hf_reference, mode_name, random_request

MAX_POSITION = 8192 + 512  # default max_query_tokens + max_tokens_per_item


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2-tiny", "qwen3-bench-s", "qwen3-0.6b"])
def test_rope_tables_are_transformers_at_long_positions(preset, record):
    """cos/sin inside a jitted program equal transformers' rotary embedding at every position
    the service accepts. The frequencies used to be evaluated by XLA's pow in each program,
    one or two ulps off HF's, which put angles up to 1e-3 rad off at position 8704 for the
    Qwen3-0.6B shape (6e-5 for qwen3-tiny). What is left is cos/sin's own last bit and, for
    head_dim 128, one frequency where torch's float32 pow is itself an ulp off."""
    cfg = PRESETS[preset]
    hf = cfg.to_hf_dict()
    rotary = {"qwen3": Qwen3RotaryEmbedding, "qwen2": Qwen2RotaryEmbedding}[cfg.model_type]
    rope = rotary(AutoConfig.for_model(hf.pop("model_type"), **hf))
    pos = np.arange(MAX_POSITION)[None]
    want = [t.numpy() for t in rope(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))]
    got = jax.jit(lambda p: rope_tables(p, cfg.head_dim, cfg.rope_theta))(jnp.asarray(pos))
    diff = max(float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, want, strict=True))
    record(f"RoPE cos/sin vs transformers, positions < {MAX_POSITION}", diff)
    assert diff <= 1e-6


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_long_query_every_mode_near_float64(ckpts, engine, record, name):
    """A 2000-token query: every mode's softmax scores stay within 3x serial's own float32
    error against HF transformers in float64, and within 1e-5."""
    query, items = random_request(seed=40, n_items=32, q_len=2000)
    ref, _ = hf_reference(ckpts[name], query, items, LABELS, dtype=torch.float64)
    err = {}
    for mode, attention in MODES:
        eng = engine(name, mode, attention, max_query_tokens=2048, max_batch_tokens=4096)
        got = score_ids(eng, query, items, LABELS, apply_softmax=True)
        label = mode_name(mode, attention)
        err[label] = float(np.abs(got - ref).max())
        record(f"long query (2000) vs HF float64, softmax, {label}", err[label])
    serial = err["serial"]
    for mode, e in err.items():
        assert e <= 1e-5, (mode, err)
        assert e <= 3 * serial, (mode, err)
    # The reference has teeth: the scores move far more than the bound from item to item.
    assert np.ptp(ref[:, 0]) > 1e-2
