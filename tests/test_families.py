"""Llama, Mistral, Gemma, Gemma 2 and Gemma 3 causal LMs (issue 25): scores equal HF
transformers' on checkpoints transformers wrote itself, in every mode, isolation bit-exact,
bfloat16, both config layouts, sharded files, and loud failures naming the field."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from models.checkpoint import load_checkpoint, make_random_checkpoint, read_hf_config
from models.config import PRESETS, from_hf_config
from models.decoder import rope_inv_freq, rope_tables
from models.engine import EngineConfig, ScoringEngine, score_ids
from models.inputs import Chunk
from tests.conftest import LABELS, MODES, TEST_ENGINE, hf_reference, mode_name, random_request
from tests.hf_families import write_with_transformers

# name -> preset. Llama 3 (rope_scaling llama3, untied), Llama 2 style (tied, plain RoPE),
# Mistral, Gemma (norm offset, embedding scale, GeLU-tanh), Gemma 2 (soft-caps,
# query_pre_attn_scalar, sandwich norms, sliding layers), Gemma 3 (q/k norms, two RoPE bases,
# linear scaling on the global layers).
FAMILIES = {
    "llama3": "llama3-tiny",
    "llama-tied": "llama-tiny-tied",
    "mistral": "mistral-tiny",
    "gemma": "gemma-tiny",
    "gemma2": "gemma2-tiny",
    "gemma3": "gemma3-tiny",
}
SHARD = "16MB"  # the 151936 x 64 float32 embedding alone is 39 MB: several files


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    """Checkpoints written by transformers' save_pretrained (transformers 5 config layout):
    each family in float32 (tied Llama sharded), Gemma and Gemma 2 in bfloat16; and the Hub
    layout of Llama 3 and Gemma 3 as our writer lays it out (same weights)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, (name, preset) in enumerate(FAMILIES.items(), 70):
        shard = SHARD if name == "llama-tied" else None
        out[name] = write_with_transformers(preset, root / name, seed=seed, max_shard_size=shard)
    for name in ("gemma", "gemma2"):
        out[f"{name}-bf16"] = write_with_transformers(
            FAMILIES[name], root / f"{name}-bf16", seed=80, dtype="bfloat16"
        )
    for seed, name in ((70, "llama3"), (75, "gemma3")):
        hub = make_random_checkpoint(FAMILIES[name], root / f"{name}-hub", seed=seed)
        out[f"{name}-hub"] = str(hub)
    return out


_ENGINES: dict[tuple, ScoringEngine] = {}


@pytest.fixture(scope="module")
def engine(fam):
    def get(name: str, mode: str = "prefix", attention: str = "auto", **settings):
        config = TEST_ENGINE | {"mode": mode, "attention": attention} | settings
        key = (name, tuple(sorted(config.items())))
        if key not in _ENGINES:
            _ENGINES[key] = ScoringEngine(fam[name], EngineConfig(**config))
        return _ENGINES[key]

    return get


def _scores(eng, query, items, **kw):
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True, **kw)
    logp = np.log(score_ids(eng, query, items, LABELS, apply_softmax=False, **kw))
    return soft, logp


# Serial and prefix for every family; the packed modes too for Llama (the plain decoder) and
# Gemma 2 (soft-caps inside attention: the kernel's paths differ there). What a family changes
# is the decoder layer and the attention's scale and soft-cap, not where a mode puts the query's
# keys; every mode on every kernel path is swept in test_parity.py and test_equivalence.py.
FAMILY_MODES = [
    (name, mode, attention)
    for name in FAMILIES
    for mode, attention in MODES
    if mode != "packed" or name in ("llama3", "gemma2")
]


@pytest.mark.parametrize(("name", "mode", "attention"), FAMILY_MODES)
def test_parity_every_mode(fam, engine, record, name, mode, attention):
    """Every mode within 1e-4 (softmax) / 1e-3 (log-prob) of HF's serial scores, and within
    the equivalence bounds (1e-5 / 1e-4) of our own serial scores."""
    query, items = random_request(seed=10, n_items=13)
    ref_soft, ref_logp = hf_reference(fam[name], query, items, LABELS)
    soft, logp = _scores(engine(name, mode, attention), query, items)
    label = f"{name} {mode_name(mode, attention)}"
    record(f"families: parity vs HF, softmax, {label}", np.abs(soft - ref_soft).max())
    record(f"families: parity vs HF, log-prob, {label}", np.abs(logp - ref_logp).max())
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3
    assert np.ptp(ref_logp[:, 0]) > 0.1  # the check has teeth
    serial_soft, serial_logp = _scores(engine(name, "serial"), query, items)
    assert np.abs(soft - serial_soft).max() <= 1e-5
    assert np.abs(logp - serial_logp).max() <= 1e-4


@pytest.mark.parametrize("name", ["llama3", "gemma2", "gemma3"])
def test_parity_item_first(fam, engine, name):
    query, items = random_request(seed=11, n_items=4)
    ref_soft, ref_logp = hf_reference(fam[name], query, items, LABELS, item_first=True)
    soft, logp = _scores(engine(name), query, items, item_first=True)
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.parametrize(("name", "mode"), [("gemma2", "prefix"), ("gemma3", "packed")])
def test_pallas_kernel_interpret_mode(fam, engine, record, name, mode):
    """The Pallas kernel (interpret mode on CPU) with Gemma's attention scale and soft-cap."""
    query, items = random_request(seed=12, n_items=9)
    ref_soft, ref_logp = hf_reference(fam[name], query, items, LABELS)
    soft, logp = _scores(engine(name, mode, "pallas"), query, items)
    record(f"families: parity vs HF, softmax, {name} {mode}-pallas", np.abs(soft - ref_soft).max())
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
@pytest.mark.parametrize("mode", ["prefix"])  # every mode under tp: test_tensor_parallel.py
def test_tensor_parallel(fam, engine, record, mode):
    """tp_size 2 on Gemma 2 (soft-caps and scale inside shard_map; sandwich norms replicated):
    within 1e-5 of tp_size 1 and within the parity bounds of HF."""
    query, items = random_request(seed=13, n_items=9)
    ref_soft, ref_logp = hf_reference(fam["gemma2"], query, items, LABELS)
    soft, logp = _scores(engine("gemma2", mode, tp_size=2), query, items)
    one_soft, _ = _scores(engine("gemma2", mode), query, items)
    record(f"families: tp=2 vs HF, softmax, gemma2 {mode}", np.abs(soft - ref_soft).max())
    assert np.abs(soft - one_soft).max() <= 1e-5
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_isolation_bit_exact(engine, record, name):
    """Changing one item (same length, longer, much longer) changes no other item's score."""
    mode = "packed" if name == "gemma2" else "prefix"
    eng = engine(name, mode)
    query, items = random_request(seed=30, n_items=15)
    rng = np.random.default_rng(5)
    keep = np.arange(len(items)) != 4
    for apply_softmax in (True, False):
        base = score_ids(eng, query, items, LABELS, apply_softmax=apply_softmax)
        for new in (
            rng.integers(0, 151_000, len(items[4])).tolist(),
            items[4] + [11, 12, 13],
            items[4] + rng.integers(0, 151_000, 40).tolist(),
        ):
            changed = list(items)
            changed[4] = new
            got = score_ids(eng, query, changed, LABELS, apply_softmax=apply_softmax)
            record(f"families: isolation, {name} {mode}", np.abs(got[keep] - base[keep]).max())
            assert np.abs(got[keep] - base[keep]).max() == 0.0
            assert not np.array_equal(got[4], base[4])


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
@pytest.mark.parametrize("mode", ["serial", "prefix"])
def test_bfloat16(fam, engine, record, name, mode):
    query, items = random_request(seed=14, n_items=9)
    path = fam[f"{name}-bf16"]
    ref_soft, _ = hf_reference(path, query, items, LABELS, dtype=torch.bfloat16)
    eng = engine(f"{name}-bf16", mode)
    assert eng.dtype_name == "bfloat16"
    soft = score_ids(eng, query, items, LABELS, apply_softmax=True)
    record(f"families: parity vs HF bf16, softmax, {name} {mode}", np.abs(soft - ref_soft).max())
    assert np.abs(soft - ref_soft).max() <= 2e-2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_layouts_agree(fam, tmp_path, name):
    """Our Hub-layout config.json (rope_theta, rope_scaling, rope_local_base_freq,
    torch_dtype) and transformers 5's (rope_parameters, per layer type for Gemma 3; dtype)
    give the same config, which is the preset's."""
    t5 = read_hf_config(fam[name])
    hub = make_random_checkpoint(FAMILIES[name], tmp_path / "hub", seed=0)
    hub = read_hf_config(hub)
    assert "rope_parameters" in t5 and "dtype" in t5 and "rope_theta" not in t5
    assert "rope_theta" in hub and "torch_dtype" in hub and "rope_parameters" not in hub
    assert from_hf_config(t5) == from_hf_config(hub) == PRESETS[FAMILIES[name]]


@pytest.mark.parametrize("name", ["llama3", "gemma3"])
def test_hub_layout_parity(fam, engine, name):
    """The Hub layout as transformers reads it (from_pretrained) and as we do: same scores."""
    query, items = random_request(seed=15, n_items=6)
    ref_soft, ref_logp = hf_reference(fam[f"{name}-hub"], query, items, LABELS)
    soft, logp = _scores(engine(f"{name}-hub"), query, items)
    assert np.abs(soft - ref_soft).max() <= 1e-4
    assert np.abs(logp - ref_logp).max() <= 1e-3


def test_sharded_checkpoint_loads(fam):
    """transformers' sharded layout (index + several files) of the tied Llama; Gemma 3's
    extra tensors land where the decoder reads them."""
    path = Path(fam["llama-tied"])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = load_checkpoint(path)
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings and "lm_head" not in params
    cfg, params = load_checkpoint(fam["gemma3"])
    assert cfg.model_type == "gemma3_text" and cfg.qk_norm and cfg.sandwich_norms
    layers = params["layers"]
    assert layers["pre_feedforward_layernorm"]["scale"].shape == (4, 64)
    assert layers["self_attn"]["q_norm"]["scale"].shape == (4, 16)


def test_rope_frequencies_are_transformers(record):
    """llama3 and linear RoPE scaling, and Gemma 3's two bases: our host frequencies are
    transformers' bit for bit, and the jitted cos/sin within 1e-6 of its rotary embedding
    at positions up to 8704."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for preset in ("llama3-tiny", "gemma3-tiny"):
        cfg = PRESETS[preset]
        hf = cfg.to_hf_dict()
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        layer_type = "full_attention" if cfg.local_rope_theta else None
        kind = cfg.rope_scaling.rope_type
        want, _ = ROPE_INIT_FUNCTIONS[kind](config, layer_type=layer_type)
        got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        np.testing.assert_array_equal(got, want.numpy())
    cfg = PRESETS["llama3-tiny"]
    hf = cfg.to_hf_dict()
    rope = LlamaRotaryEmbedding(AutoConfig.for_model(hf.pop("model_type"), **hf))
    pos = np.arange(8704)[None]
    want = [t.numpy() for t in rope(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))]
    got = jax.jit(lambda p: rope_tables(p, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))(
        jnp.asarray(pos)
    )
    diff = max(float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, want, strict=True))
    record("families: llama3 RoPE cos/sin vs transformers, positions < 8704", diff)
    assert diff <= 1e-6


def test_batching_bit_identical_and_no_compiles_after_warmup(fam):
    """Gemma 2: chunks of several requests scored together give each request's scores alone,
    bit for bit, and after warm-up nothing compiles."""
    from tests.test_compile import COMPILES, _random_chunks

    limits = {"max_batch_tokens": 1024, "max_item_tokens": 32, "max_query_tokens": 300}
    eng = ScoringEngine(fam["gemma2"], EngineConfig(mode="prefix", max_labels=4, **limits))
    eng.warmup()
    before = len(COMPILES)
    rng = np.random.default_rng(3)
    for _ in range(4):
        chunks = _random_chunks(rng, limits, max_labels=4)
        together = eng.score(chunks)
        for c, got in zip(chunks, together, strict=True):
            (alone,) = eng.score([c])
            np.testing.assert_array_equal(got, alone)
    assert len(COMPILES) == before


# ----------------------------------------------------------------- loud failures


def _edit_config(src: str, dst: Path, change: dict) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text()) | change
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ("llama3", {"rope_parameters": {"rope_type": "dynamic"}}, "rope_type 'dynamic'"),
        ("llama3", {"mlp_bias": True}, "mlp_bias"),
        ("llama3", {"architectures": ["LlamaForTokenClassification"]}, "architectures"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"hidden_activation": "relu"}, "hidden_activation 'relu'"),
        (
            "gemma3",
            {"rope_parameters": {"full_attention": {"rope_type": "yarn"}}},
            "full_attention.rope_type 'yarn'",
        ),
        ("mistral", {"model_type": "mixtral"}, "model_type"),
    ],
)
def test_unsupported_configs_raise(fam, tmp_path, name, change, message):
    bad = _edit_config(fam[name], tmp_path / "bad", change)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("gemma2", lambda s: s.pop("model.layers.1.pre_feedforward_layernorm.weight"), "missing"),
        ("gemma3", lambda s: s.pop("model.layers.0.self_attn.k_norm.weight"), "missing"),
        ("llama3", lambda s: s.pop("lm_head.weight"), "missing"),
        (
            "mistral",
            lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}),
            "unknown tensor",
        ),
        (
            "gemma",
            lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}),
            "does not belong",
        ),
        (
            "gemma2",
            lambda s: s.update({"model.norm.weight": np.ones(32, np.float32)}),
            "model.norm.weight: shape",
        ),
    ],
)
def test_bad_tensors_raise(fam, tmp_path, name, edit, message):
    dst = tmp_path / "bad"
    shutil.copytree(fam[name], dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        load_checkpoint(dst)


def test_windowed_checkpoints_load_whatever_the_engine_limits(fam, tmp_path):
    """A window shorter than a query and an item is applied, not refused (tests/test_windows.py
    checks the scores)."""
    small = _edit_config(fam["mistral"], tmp_path / "m", {"sliding_window": 64})
    eng = ScoringEngine(small, EngineConfig(**TEST_ENGINE))
    assert eng.cfg.layer_windows == (64, 64)
    assert PRESETS["gemma3-tiny"].layer_windows == (4096, 4096, 4096, 2**30)


def test_soft_caps_matter(fam):
    """The Gemma 2 checks have teeth: without its soft-caps the scores move beyond 1e-3."""
    query, items = random_request(seed=16, n_items=5)
    _, ref_logp = hf_reference(fam["gemma2"], query, items, LABELS)
    for change in ({"attn_softcap": None}, {"final_softcap": None}):
        # The same weights, run by a decoder without that cap.
        uncapped = ScoringEngine(fam["gemma2"], EngineConfig(**(TEST_ENGINE | {"mode": "serial"})))
        uncapped.run_cfg = dataclasses.replace(uncapped.run_cfg, **change)
        logp = np.log(score_ids(uncapped, query, items, LABELS))
        assert np.abs(logp - ref_logp).max() > 1e-2, change


def test_chunk_labels_still_required_for_lm(engine):
    (err,) = engine("llama3").score([Chunk((1, 2), ((3,),), ())])
    assert isinstance(err, ValueError) and "label_token_ids" in str(err)
