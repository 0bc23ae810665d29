"""HF checkpoint loading: both config layouts, shards, dtypes, and loud failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.checkpoint import has_random_weights, load_checkpoint
from models.config import PRESETS, from_hf_config


def test_both_config_layouts_load(ckpts):
    hub = json.loads(Path(ckpts["qwen3"], "config.json").read_text())
    t5 = json.loads(Path(ckpts["qwen3-untied"], "config.json").read_text())
    assert "rope_theta" in hub and "torch_dtype" in hub
    assert "rope_parameters" in t5 and "dtype" in t5 and "rope_theta" not in t5
    assert from_hf_config(hub).rope_theta == from_hf_config(t5).rope_theta == 1e6


def test_loaded_shapes_and_dtypes(ckpts):
    cfg, params = load_checkpoint(ckpts["qwen2"])
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and not cfg.qk_norm
    assert params["layers"]["self_attn"]["q_proj"]["bias"].shape == (2, 4, 16)
    assert params["lm_head"].shape == (151936, 64)  # HF layout: the vocab is walked in blocks
    cfg, params = load_checkpoint(ckpts["qwen3-bf16"])
    assert str(params["embed_tokens"]["embedding"].dtype) == "bfloat16"
    _, params = load_checkpoint(ckpts["qwen3-bf16"], dtype="float32")
    assert str(params["embed_tokens"]["embedding"].dtype) == "float32"
    assert has_random_weights(ckpts["qwen3"])


def test_weights_map_to_hf_layout(ckpts):
    """HF [out, in] matrices land transposed in the Flax kernels ([hidden, heads, dim] etc.)."""
    state = load_file(f"{ckpts['qwen3']}/model.safetensors")
    _, params = load_checkpoint(ckpts["qwen3"])
    w = state["model.layers.1.self_attn.q_proj.weight"]
    kernel = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1])
    np.testing.assert_array_equal(kernel.reshape(64, -1), w.T)
    w = state["model.layers.0.self_attn.o_proj.weight"]
    kernel = np.asarray(params["layers"]["self_attn"]["o_proj"]["kernel"][0])
    np.testing.assert_array_equal(kernel.reshape(-1, 64), w.T)


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(f"{dst}/model.safetensors")
    edit(state)
    save_file(state, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing"),
        (
            lambda s: s.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
            "unknown tensor",
        ),
        (
            lambda s: s.update({"model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)}),
            "shape",
        ),
        (
            lambda s: s.update(
                {"model.layers.7.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}
            ),
            "does not belong",
        ),
    ],
)
def test_bad_checkpoints_raise(ckpts, tmp_path, edit, message):
    bad = _corrupt(ckpts["qwen3"], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(bad)


def test_duplicate_tensor_across_shards_raises(ckpts, tmp_path):
    bad = tmp_path / "dup"
    shutil.copytree(ckpts["qwen2"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    first = load_file(str(bad / files[0]))
    name = next(iter(first))
    last = load_file(str(bad / files[-1]))
    last[name] = first[name]
    save_file(last, str(bad / files[-1]), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="twice"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type"),
        ({"use_sliding_window": True}, "sliding"),
        ({"num_key_value_heads": 3}, "divisible"),
    ],
)
def test_unsupported_configs_raise(change, message):
    hf = PRESETS["qwen3-tiny"].to_hf_dict() | change
    with pytest.raises(ValueError, match=message):
        from_hf_config(hf)
