"""HF-format checkpoints: load (single or sharded safetensors) and write random-init ones.

The HF tensor names are mapped to our Flax parameter tree by one regex table per family
(KEY_TABLES); the names and shapes a checkpoint must hold come from its config (hf_shapes), every
tensor's shape is checked, and unknown, missing or duplicate names raise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import FULL, PRESETS, SLIDING, ModelConfig, from_hf_config
from models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

log = logging.getLogger(__name__)

# Marker in config.json of the checkpoints we generate, so every server using one says so.
RANDOM_WEIGHTS_KEY = "mis_serve_random_weights"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Tensors some checkpoints carry that hold no weights of ours (recomputed buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

Rule = tuple[re.Pattern[str], str, str]


def _rules(*rules: tuple[str, str, str]) -> tuple[Rule, ...]:
    return tuple((re.compile(pattern), path, kind) for pattern, path, kind in rules)


# (HF name regex, Flax path template, kind). Layer rules capture the layer index first and fill
# `{}` with the second group. kind: "kernel:N" = HF [out, in] matrix whose transpose is reshaped
# to the Flax kernel with N leading input dims; "reshape" = same data, Flax shape.
_DECODER = _rules(
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", "reshape"),
    (r"model\.norm\.weight", "norm/scale", "reshape"),
    (r"lm_head\.weight", "lm_head", "reshape"),
    (r"score\.weight", "score", "reshape"),  # *ForSequenceClassification
    (
        r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight",
        "layers/self_attn/{}_proj/kernel",
        "kernel:1",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.(o)_proj\.weight",
        "layers/self_attn/{}_proj/kernel",
        "kernel:2",
    ),
    (
        r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        "layers/{}/scale",
        "reshape",
    ),
    (
        r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight",
        "layers/mlp/{}_proj/kernel",
        "kernel:1",
    ),
)
_BIASES = _rules(
    (
        r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias",
        "layers/self_attn/{}_proj/bias",
        "reshape",
    )
)
_QK_NORM = _rules(
    (
        r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight",
        "layers/self_attn/{}_norm/scale",
        "reshape",
    )
)
_SANDWICH = _rules(  # Gemma 2/3: norms around the MLP (post_attention_layernorm is in _DECODER)
    (
        r"model\.layers\.(\d+)\.(pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
        "layers/{}/scale",
        "reshape",
    )
)
# The tensors each family's checkpoints may hold; which of them a checkpoint must hold, and
# their shapes, come from its config (hf_shapes).
KEY_TABLES: dict[str, tuple[Rule, ...]] = {
    "qwen3": _DECODER + _BIASES + _QK_NORM,
    "qwen2": _DECODER + _BIASES,
    "llama": _DECODER + _BIASES,
    "mistral": _DECODER,
    "gemma": _DECODER + _BIASES,
    "gemma2": _DECODER + _BIASES + _SANDWICH,
    "gemma3_text": _DECODER + _BIASES + _QK_NORM + _SANDWICH,
}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape HF transformers writes for this model."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if cfg.num_labels:
        shapes["score.weight"] = (cfg.num_labels, d)
    elif not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        }
        if cfg.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if cfg.sandwich_norms:
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (d,),
                p + "post_feedforward_layernorm.weight": (d,),
            }
    return shapes


def _match(name: str, model_type: str) -> tuple[str, int | None, str]:
    for pattern, template, kind in KEY_TABLES[model_type]:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        if m.groups():
            return template.format(m.group(2)), int(m.group(1)), kind
        return template, None, kind
    raise ValueError(f"unknown tensor {name!r} in checkpoint (model_type {model_type!r})")


def _to_flax(w: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind.startswith("kernel"):
        w = w.T
    return np.ascontiguousarray(w.reshape(shape))


def _iter_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
        )
    for fname in files:
        with safe_open(str(model_dir / fname), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return json.loads(path.read_text())


def has_random_weights(model_dir: str | Path) -> bool:
    """True for checkpoints written by `make_random_checkpoint` (scores mean nothing)."""
    return bool(read_hf_config(Path(model_dir)).get(RANDOM_WEIGHTS_KEY, False))


def load_checkpoint(model_dir: str | Path, dtype: str | None = None) -> tuple[ModelConfig, Any]:
    """Load `config.json` + safetensors into (config, Flax params) in `dtype` (default: saved)."""
    # JAX and the model only here, where tensors become the model's arrays: the ingress reads
    # configs and writes demo checkpoints through this module without loading either.
    import jax.numpy as jnp

    from models.decoder import param_shapes

    model_dir = Path(model_dir)
    cfg = from_hf_config(read_hf_config(model_dir))
    dtype = dtype or cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    expected_hf = hf_shapes(cfg)
    flax_shapes = param_shapes(cfg)
    stacked: dict[str, list[np.ndarray | None]] = {}
    flat: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name, w in _iter_tensors(model_dir):
        if _IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings and not cfg.num_labels:
            continue  # some exporters write the tied head anyway; the embedding is used
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in {model_dir}")
        seen.add(name)
        if name not in expected_hf:
            _match(name, cfg.model_type)  # raises for names we do not know at all
            raise ValueError(f"tensor {name!r} does not belong to this config ({cfg.architecture})")
        if tuple(w.shape) != expected_hf[name]:
            raise ValueError(f"{name}: shape {tuple(w.shape)} != expected {expected_hf[name]}")
        path, layer, kind = _match(name, cfg.model_type)
        w = np.asarray(w).astype(DTYPES[dtype])
        if layer is None:
            flat[path] = _to_flax(w, kind, flax_shapes[path])
        else:
            slots = stacked.setdefault(path, [None] * cfg.num_layers)
            slots[layer] = _to_flax(w, kind, flax_shapes[path][1:])
    missing = sorted(set(expected_hf) - seen)
    if missing:
        raise ValueError(f"{model_dir} is missing {len(missing)} tensors, e.g. {missing[:3]}")
    for path, slots in stacked.items():
        flat[path] = np.stack(slots)
    if set(flat) != set(flax_shapes):
        raise ValueError(f"parameter tree mismatch: {sorted(set(flat) ^ set(flax_shapes))}")
    params: dict[str, Any] = {}
    for path, arr in flat.items():
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr)
    log.info(
        "loaded %s (%s, %d layers, %s) from %s",
        cfg.architecture,
        dtype,
        cfg.num_layers,
        f"{cfg.num_labels} classes {list(cfg.class_labels)}"
        if cfg.num_labels
        else ("tied" if cfg.tie_word_embeddings else "untied"),
        model_dir,
    )
    if has_random_weights(model_dir):
        log.warning(
            "*** %s holds RANDOM WEIGHTS (a generated demo checkpoint): its scores are "
            "meaningless; load a trained checkpoint for real ranking ***",
            model_dir,
        )
    return cfg, params


def random_hf_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in HF layout.

    Scaled so a tiny model's outputs depend strongly on its input (embeddings N(0, 0.5),
    matrices N(0, 1/fan_in), norm weights near 1): with HF's N(0, 0.02) init a tiny model gives
    near-uniform distributions in which a masking bug would hide below test tolerances.
    Gemma's norms scale by 1 + w: theirs are drawn near 0.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = (0.0 if cfg.norm_offset else 1.0) + 0.1 * rng.standard_normal(shape, np.float32)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif "embed_tokens" in name:
            w = 0.5 * rng.standard_normal(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
        state[name] = w.astype(np.float32)
    return state


def save_hf_checkpoint(
    cfg: ModelConfig,
    state: dict[str, np.ndarray],
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    config_layout: str = "hub",
    random_weights: bool = False,
) -> Path:
    """Write `config.json` + safetensors (sharded with an index when over `max_shard_bytes`)
    and the real Qwen3 tokenizer files, the way HF `save_pretrained` lays them out.

    `config_layout`: "hub" (`rope_theta`, `torch_dtype`) or "transformers5"
    (`rope_parameters`, `dtype`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict() | {"torch_dtype": dtype}
    if random_weights:
        hf[RANDOM_WEIGHTS_KEY] = True
    if config_layout == "transformers5":
        rope = {"rope_theta": hf.pop("rope_theta"), "rope_type": "default"}
        rope |= hf.pop("rope_scaling") or {}
        if cfg.local_rope_theta is not None:  # Gemma 3: one RoPE per layer type
            local = {"rope_theta": hf.pop("rope_local_base_freq"), "rope_type": "default"}
            rope = {FULL: rope, SLIDING: local}
        hf["rope_parameters"] = rope
        hf["dtype"] = hf.pop("torch_dtype")
    elif config_layout != "hub":
        raise ValueError(f"{config_layout=} is not 'hub' or 'transformers5'")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in state.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if max_shard_bytes and size + t.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, fname)
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tok_dir = bundled_tokenizer_dir()
    for fname in TOKENIZER_FILES:
        if (tok_dir / fname).is_file():
            shutil.copy(tok_dir / fname, out / fname)
    return out


def make_random_checkpoint(
    preset: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "float32", **save_kw: Any
) -> Path:
    """Write a random-init checkpoint of a named preset (RANDOM WEIGHTS: scores mean nothing)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    out = save_hf_checkpoint(
        cfg, random_hf_state(cfg, seed), out_dir, dtype=dtype, random_weights=True, **save_kw
    )
    log.warning("wrote RANDOM-WEIGHT checkpoint %s (seed %d, %s) to %s", preset, seed, dtype, out)
    return out


def cache_root() -> Path:
    """mis-serve's files on this machine: `$MIS_SERVE_CACHE`, else ~/.cache/mis-serve."""
    return Path(os.environ.get("MIS_SERVE_CACHE") or Path.home() / ".cache" / "mis-serve")


def demo_checkpoint_dir(preset: str, seed: int = 0) -> Path:
    """Where the demo checkpoint of `preset` lives (under cache_root())."""
    return cache_root() / f"{preset}-random-seed{seed}"


def ensure_demo_checkpoint(preset: str, seed: int = 0) -> Path:
    """The random-weight demo checkpoint of `preset`, generated on first use. Safe when several
    processes race: each writes a private temp dir and renames it into place."""
    path = demo_checkpoint_dir(preset, seed)
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    make_random_checkpoint(preset, tmp, seed=seed)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path
