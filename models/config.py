"""Model configuration: one frozen dataclass for the Qwen3 and Qwen2/Qwen2.5 families.

Built from a HF `config.json` (both the Hub layout with `rope_theta`/`torch_dtype` and the
transformers 5 layout with `rope_parameters`/`dtype`), or from a named preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a Qwen-family decoder (hashable: used as a jit static)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: always; Qwen3: `attention_bias`
    o_bias: bool  # Qwen3 `attention_bias` also covers o_proj; Qwen2 never
    qk_norm: bool  # Qwen3 normalises q and k per head before RoPE
    dtype: str = "float32"  # dtype the checkpoint was saved in

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{self.model_type=} is not one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} must be divisible by {self.num_kv_heads=}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` HF transformers writes for this model (Hub layout)."""
        arch = "Qwen3ForCausalLM" if self.model_type == "qwen3" else "Qwen2ForCausalLM"
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "max_position_embeddings": 40960,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "torch_dtype": self.dtype,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "qwen3":
            d["head_dim"] = self.head_dim
            d["attention_bias"] = self.qkv_bias
        return d


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from either config layout; only plain (unscaled) RoPE is implemented."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_parameters.rope_theta nor rope_theta")
    return float(theta)


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Translate a HF `config.json` dict; unsupported features raise instead of being ignored."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    is_qwen3 = model_type == "qwen3"
    attention_bias = bool(hf.get("attention_bias", False))
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if is_qwen3 else True,
        o_bias=attention_bias if is_qwen3 else False,
        qk_norm=is_qwen3,
        dtype=str(dtype),
    )


def _qwen3(**kw: Any) -> ModelConfig:
    base = dict(
        model_type="qwen3",
        vocab_size=151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        qkv_bias=False,
        o_bias=False,
        qk_norm=True,
    )
    return ModelConfig(**{**base, **kw})


# Small enough for fast tests, but with GQA (4 q heads over 2 kv heads) and the real vocab.
_TINY = dict(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128
)
_QWEN3_TINY = _qwen3(**_TINY)

PRESETS: dict[str, ModelConfig] = {
    "qwen3-tiny": _QWEN3_TINY,
    "qwen3-tiny-untied": dataclasses.replace(_QWEN3_TINY, tie_word_embeddings=False),
    "qwen3-bench-s": _qwen3(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1536,
    ),
    "qwen3-0.6b": _qwen3(
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
    ),
    # Qwen2 family: qkv bias, no q/k norm, untied head.
    "qwen2-tiny": dataclasses.replace(
        _QWEN3_TINY, model_type="qwen2", tie_word_embeddings=False, qkv_bias=True, qk_norm=False
    ),
}
