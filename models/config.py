"""Model configuration: one frozen dataclass of switches for every supported decoder family.

Qwen3, Qwen2/Qwen2.5, Llama 2/3.x, Mistral, Gemma, Gemma 2 and Gemma 3 (text) are one decoder
that differs in a handful of switches (norm offset, embedding scale, activation, q/k norm,
biases, sandwich norms, soft-caps, RoPE scaling and bases, sliding windows); the head at the end
is the LM head read at label tokens or a sequence-classification head, from `architectures`.

Built from a HF `config.json` (both the Hub layout with `rope_theta`/`rope_scaling`/`torch_dtype`
and the transformers 5 layout with `rope_parameters`/`dtype`), or from a named preset. Anything
the decoder does not implement raises, naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "qwen3",
    "qwen2",
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
)
# HF architecture class names by model_type (config.json `architectures`), causal LM first.
ARCHITECTURES: dict[str, str] = {
    "qwen3": "Qwen3",
    "qwen2": "Qwen2",
    "llama": "Llama",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer types
UNLIMITED = 2**30  # the window of a layer without one (longer than any sequence)


class Head(enum.Enum):
    """What the model computes at a score position."""

    LM = "lm"  # next-token logits read at label tokens (`*ForCausalLM`)
    CLASSIFICATION = "classification"  # `*ForSequenceClassification`: class logits of `score`


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF's RoPE frequency scaling (`rope_type` != default): `linear` divides every frequency by
    `factor`; `llama3` divides the low frequencies and interpolates the middle band."""

    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a decoder (hashable: used as a jit static). The defaults of
    the switches are the Qwen/Llama decoder's."""

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
    qkv_bias: bool  # Qwen2: always; Qwen3/Llama/Gemma: `attention_bias`
    o_bias: bool  # `attention_bias` covers o_proj too (Qwen3, Llama, Gemma); Qwen2 never
    qk_norm: bool  # Qwen3, Gemma 3: q and k normalised per head before RoPE
    dtype: str = "float32"  # dtype the checkpoint was saved in
    # Family switches.
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), in float32
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden) (cast to the dtype)
    activation: str = "silu"  # MLP gate: "silu" | "gelu_pytorch_tanh" | "gelu" (exact)
    sandwich_norms: bool = False  # Gemma 2/3: attention output normed, pre/post MLP norms
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by its -1/2 power
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: LM head logits -> cap * tanh(logits / cap)
    rope_scaling: RopeScaling | None = None  # Llama 3.x (`llama3`), Gemma 3 global (`linear`)
    local_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding-window layers
    sliding_window: int | None = None  # keys a sliding layer's token sees (itself included)
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; () = all FULL
    # Head.
    num_labels: int = 0  # classification head: classes (`score.weight` rows); 0 = LM head
    class_labels: tuple[str, ...] = ()  # `id2label`, in class order
    # Classification head: it pools the last token that is not this one, as transformers does
    # (None: the last token). An LM head reads the last token whatever it is.
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{self.model_type=} is not one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} must be divisible by {self.num_kv_heads=}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.activation=} is not one of {sorted(ACTIVATIONS)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)=} must equal {self.num_layers=}")
        if any(t not in (SLIDING, FULL) for t in self.layer_types):
            raise ValueError(f"layer_types {self.layer_types} must be {SLIDING!r} or {FULL!r}")
        if self.num_labels and len(self.class_labels) != self.num_labels:
            raise ValueError(f"{len(self.class_labels)=} must equal {self.num_labels=}")
        if self.pad_token_id is not None and not self.num_labels:
            raise ValueError("pad_token_id is a classification head's (its pooling)")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head(self) -> Head:
        return Head.CLASSIFICATION if self.num_labels else Head.LM

    @property
    def architecture(self) -> str:
        if not self.num_labels:
            return ARCHITECTURES[self.model_type] + "ForCausalLM"
        if self.model_type == "gemma3_text":  # Gemma3ForSequenceClassification is multimodal
            return "Gemma3TextForSequenceClassification"
        return ARCHITECTURES[self.model_type] + "ForSequenceClassification"

    @property
    def attn_scale(self) -> float:
        """Multiplier of q.k: 1/sqrt(query_pre_attn_scalar) (Gemma 2/3), else 1/sqrt(head_dim)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def windowed_layers(self) -> tuple[int, ...]:
        """Layers whose attention is limited to `sliding_window` keys."""
        if self.sliding_window is None:
            return ()
        if not self.layer_types:  # Mistral: every layer
            return tuple(range(self.num_layers))
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer, the keys a token sees at most (FULL layers: UNLIMITED); () when no layer
        has a window."""
        if not self.windowed_layers:
            return ()
        windowed = set(self.windowed_layers)
        return tuple(
            self.sliding_window if i in windowed else UNLIMITED  # type: ignore[misc]
            for i in range(self.num_layers)
        )

    @property
    def layer_rope(self) -> tuple[int, ...]:
        """Per layer, which RoPE table it uses: 0 = `rope_theta` (+ scaling), 1 = the sliding
        layers' `local_rope_theta` (Gemma 3). () when every layer uses table 0."""
        if self.local_rope_theta is None:
            return ()
        return tuple(int(t == SLIDING) for t in self.layer_types)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` HF transformers writes for this model (Hub layout)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.activation,
            "max_position_embeddings": 40960,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {
                k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None
            }
            if self.rope_scaling.rope_type == "linear":
                d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_scaling.factor}
        match self.model_type:
            case "qwen3" | "qwen2":
                d |= {
                    "bos_token_id": 151643,
                    "eos_token_id": 151645,
                    "use_sliding_window": False,
                    "sliding_window": None,
                }
                if self.model_type == "qwen3":
                    d["attention_bias"] = self.qkv_bias
                else:
                    del d["head_dim"]
            case "llama":
                d |= {"attention_bias": self.qkv_bias, "mlp_bias": False}
            case "mistral":
                d["sliding_window"] = self.sliding_window
            case "gemma" | "gemma2" | "gemma3_text":
                d |= {"attention_bias": self.qkv_bias, "hidden_activation": self.activation}
                d |= {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
        if self.model_type in ("gemma2", "gemma3_text"):
            d |= {
                "query_pre_attn_scalar": int(self.query_pre_attn_scalar or 0),
                "attn_logit_softcapping": self.attn_softcap,
                "final_logit_softcapping": self.final_softcap,
                "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types),
            }
        if self.local_rope_theta is not None:
            d["rope_local_base_freq"] = self.local_rope_theta
        if self.num_labels:
            d["id2label"] = {str(i): label for i, label in enumerate(self.class_labels)}
            d["label2id"] = {label: i for i, label in enumerate(self.class_labels)}
            if self.pad_token_id is not None:
                d["pad_token_id"] = self.pad_token_id
        return d


ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


def check_tp_size(cfg: ModelConfig, tp_size: int) -> None:
    """Raise a ValueError naming the field when `cfg` cannot be split over `tp_size` devices
    (models/parallel.py splits it; the ingress checks a config without loading JAX)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if cfg.num_heads % tp_size:
        raise ValueError(f"tp_size {tp_size} must divide num_attention_heads {cfg.num_heads}")
    kv = cfg.num_kv_heads
    if kv % tp_size and tp_size % kv:
        raise ValueError(
            f"tp_size {tp_size} and num_key_value_heads {kv} must divide one another "
            "(KV heads are split, or repeated when there are fewer than devices)"
        )
    if cfg.intermediate_size % tp_size:
        raise ValueError(f"tp_size {tp_size} must divide intermediate_size {cfg.intermediate_size}")


def _rope(params: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of one RoPE parameter dict (`rope_type`, `rope_theta`, `factor`, ...)."""
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"{where}.rope_type {rope_type!r} is not supported (rope types implemented: "
            "default, linear, llama3)"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}.partial_rotary_factor {params['partial_rotary_factor']} != 1")
    theta = params.get("rope_theta")
    if theta is None:
        raise ValueError(f"config.json has no {where}.rope_theta")
    match rope_type:
        case "default":
            return float(theta), None
        case "linear":
            return float(theta), RopeScaling("linear", float(params["factor"]))
        case "llama3":
            scaling = RopeScaling(
                "llama3",
                float(params["factor"]),
                float(params["low_freq_factor"]),
                float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]),
            )
            return float(theta), scaling
    raise AssertionError(rope_type)


def _rope_fields(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """rope_theta, rope_scaling and local_rope_theta from either config layout."""
    params = hf.get("rope_parameters")
    if params and isinstance(params.get(FULL), dict):  # transformers 5, per layer type (Gemma 3)
        theta, scaling = _rope(params[FULL], f"rope_parameters.{FULL}")
        local, local_scaling = _rope(params.get(SLIDING) or {}, f"rope_parameters.{SLIDING}")
        if local_scaling is not None:
            raise ValueError(f"rope_parameters.{SLIDING}.rope_type must be default")
        return {"rope_theta": theta, "rope_scaling": scaling, "local_rope_theta": local}
    if params:  # transformers 5
        merged = {"rope_theta": hf.get("rope_theta", default_theta)} | params
        theta, scaling = _rope(merged, "rope_parameters")
    else:  # Hub: rope_theta + rope_scaling
        scaling = hf.get("rope_scaling") or {}
        merged = {"rope_theta": hf.get("rope_theta", default_theta)} | scaling
        theta, scaling = _rope(merged, "rope_scaling")
    return {"rope_theta": theta, "rope_scaling": scaling}


def _layer_types(hf: dict[str, Any], num_layers: int, gemma2: bool) -> tuple[str, ...]:
    """Gemma 2/3 `layer_types`, or what transformers makes of a config without them: every
    other layer global (Gemma 2), every `sliding_window_pattern`-th (Gemma 3, default 6; the
    field of configs written before transformers had `layer_types`). transformers' Gemma 2
    ignores `sliding_window_pattern`, and so do we."""
    types = hf.get("layer_types")
    if types is None:
        pattern = 2 if gemma2 else int(hf.get("sliding_window_pattern") or 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    return tuple(types)


def _qwen(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (Qwen's sliding window)")
    qwen3 = hf["model_type"] == "qwen3"
    bias = bool(hf.get("attention_bias", False))
    return {
        "qkv_bias": bias if qwen3 else True,
        "o_bias": bias if qwen3 else False,
        "qk_norm": qwen3,
        **_rope_fields(hf, 10000.0),
    }


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if int(hf.get("pretraining_tp") or 1) != 1:
        raise ValueError(f"pretraining_tp {hf['pretraining_tp']} is not supported (only 1)")
    bias = bool(hf.get("attention_bias", False))
    out = {"qkv_bias": bias, "o_bias": bias, "qk_norm": False, **_rope_fields(hf, 10000.0)}
    if hf["model_type"] == "mistral":
        out["sliding_window"] = hf.get("sliding_window", 4096)
    return out


def _gemma(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is not supported")
    bias = bool(hf.get("attention_bias", False))
    out: dict[str, Any] = {
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": model_type == "gemma3_text",
        "norm_offset": True,
        "embed_scale": True,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }
    if model_type == "gemma":
        out["activation"] = hf.get("hidden_act", "gelu_pytorch_tanh")  # what transformers 5 reads
        return out | _rope_fields(hf, 10000.0)
    out["activation"] = hf.get("hidden_activation", "gelu_pytorch_tanh")
    gemma2 = model_type == "gemma2"
    num_layers = int(hf["num_hidden_layers"])
    out |= {
        "sandwich_norms": True,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
        "attn_softcap": hf.get("attn_logit_softcapping", 50.0 if gemma2 else None),
        "final_softcap": hf.get("final_logit_softcapping", 30.0 if gemma2 else None),
        "sliding_window": hf.get("sliding_window", 4096),
        "layer_types": _layer_types(hf, num_layers, gemma2),
    }
    if gemma2:
        return out | _rope_fields(hf, 10000.0)
    rope = _rope_fields(hf, 1e6)
    rope.setdefault("local_rope_theta", float(hf.get("rope_local_base_freq", 10000.0)))
    return out | rope


_FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "qwen3": _qwen,
    "qwen2": _qwen,
    "llama": _llama,
    "mistral": _llama,
    "gemma": _gemma,
    "gemma2": _gemma,
    "gemma3_text": _gemma,
}


def _head(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The head from `architectures`: a causal LM, or a sequence classifier with `id2label`."""
    archs = hf.get("architectures") or [ARCHITECTURES[model_type] + "ForCausalLM"]
    if len(archs) != 1:
        raise ValueError(f"architectures {archs}: expected exactly one")
    base = ARCHITECTURES[model_type]
    if model_type == "gemma3_text":
        base = "Gemma3Text" if archs[0] == "Gemma3TextForSequenceClassification" else "Gemma3"
    match archs[0].removeprefix(base):
        case "ForCausalLM":
            return {}
        case "ForSequenceClassification":
            id2label = hf.get("id2label") or {}
            n = int(hf.get("num_labels") or len(id2label) or 2)
            labels = tuple(str(id2label.get(str(i), f"LABEL_{i}")) for i in range(n))
            pad = hf.get("pad_token_id")
            if isinstance(pad, list):  # transformers allows a list for eos, not for pad
                raise ValueError(f"pad_token_id {pad}: expected one token id")
            pad = None if pad is None else int(pad)
            return {"num_labels": n, "class_labels": labels, "pad_token_id": pad}
    raise ValueError(
        f"architectures {archs[0]!r} is not supported for model_type {model_type!r}; expected "
        f"{ARCHITECTURES[model_type]}ForCausalLM or a ForSequenceClassification of it"
    )


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Translate a HF `config.json` dict; unsupported features raise instead of being ignored."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    fields: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": num_heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or num_heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(hf["intermediate_size"]),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "dtype": str(dtype),
        "activation": hf.get("hidden_act", "silu"),
    }
    fields |= _FAMILIES[model_type](hf)
    fields |= _head(hf, model_type)
    if fields["activation"] not in ACTIVATIONS:
        key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
        raise ValueError(f"{key} {fields['activation']!r} is not supported ({ACTIVATIONS})")
    for key in ("attn_softcap", "final_softcap", "sliding_window"):
        if fields.get(key) is not None:
            fields[key] = float(fields[key]) if key != "sliding_window" else int(fields[key])
    return ModelConfig(**fields)


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
# Other families: the Qwen vocab too (the bundled tokenizer is Qwen3's), their own switches.
_LLAMA_TINY = dataclasses.replace(
    _QWEN3_TINY,
    model_type="llama",
    qk_norm=False,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
)
_GEMMA_TINY = dataclasses.replace(
    _QWEN3_TINY,
    model_type="gemma",
    qk_norm=False,
    rope_theta=10000.0,
    norm_offset=True,
    embed_scale=True,
    activation="gelu_pytorch_tanh",
)
_GEMMA2_TINY = dataclasses.replace(
    _GEMMA_TINY,
    model_type="gemma2",
    num_layers=4,
    sandwich_norms=True,
    query_pre_attn_scalar=24.0,
    attn_softcap=5.0,
    final_softcap=3.0,
    sliding_window=4096,
    layer_types=(SLIDING, FULL) * 2,
)
_GEMMA3_TINY = dataclasses.replace(
    _GEMMA2_TINY,
    model_type="gemma3_text",
    qk_norm=True,
    attn_softcap=None,
    final_softcap=None,
    rope_theta=1e6,
    rope_scaling=RopeScaling("linear", 8.0),
    local_rope_theta=10000.0,
    layer_types=(SLIDING, SLIDING, SLIDING, FULL),
)

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
    # Llama 3.x: `rope_scaling` llama3 (original context 64 tokens, so the tiny model's
    # positions cross every band of the scaling), untied; and tied without scaling (Llama 2).
    "llama3-tiny": _LLAMA_TINY,
    "llama-tiny-tied": dataclasses.replace(
        _LLAMA_TINY, tie_word_embeddings=True, rope_scaling=None, rope_theta=10000.0
    ),
    "mistral-tiny": dataclasses.replace(
        _LLAMA_TINY, model_type="mistral", rope_scaling=None, rope_theta=1e6, sliding_window=None
    ),
    "gemma-tiny": _GEMMA_TINY,
    "gemma2-tiny": _GEMMA2_TINY,
    "gemma3-tiny": _GEMMA3_TINY,
    # Sequence-classification heads (`score.weight`): a 3-class Qwen3 padding with
    # <|endoftext|> (Qwen's pad token), and a 1-logit Llama padding with its eos (<|im_end|>
    # in this vocab), as many reward models and rerankers do.
    "qwen3-tiny-cls": dataclasses.replace(
        _QWEN3_TINY,
        num_labels=3,
        class_labels=("negative", "neutral", "positive"),
        pad_token_id=151643,
    ),
    "llama3-tiny-cls": dataclasses.replace(
        _LLAMA_TINY, num_labels=1, class_labels=("relevant",), pad_token_id=151645
    ),
}
