"""LoRA adapters as `peft` writes them (`adapter_config.json` + `adapter_model.safetensors`),
read strictly into per-module arrays stacked over layers.

What an adapter targets comes from its tensors, not from re-implementing peft's matching of
`target_modules`: peft writes one `lora_A`/`lora_B` pair per module it wrapped, so the tensors
are the ground truth. `adapter_config.json` supplies only the scaling (`r`, `lora_alpha`,
`use_rslora`, `rank_pattern`, `alpha_pattern`) and the options that would change the forward;
those we do not implement are refused, naming the field, rather than silently ignored. Like the
base checkpoint's key table (models/checkpoint.py), every tensor must land somewhere: an unknown
name, a missing half of a pair or a wrong shape raises.

numpy and safetensors only: the engine loads adapters without torch or peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models.config import ModelConfig

log = logging.getLogger(__name__)

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MAX_RANK = 64
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_PARENT = {m: "self_attn" for m in LORA_MODULES[:4]} | {m: "mlp" for m in LORA_MODULES[4:]}
# peft prefixes every key with `base_model.model.` (the PeftModel's LoraModel's wrapped model),
# then the transformers module name, then `lora_A`/`lora_B` with the adapter name removed.
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)
# modules_to_save: peft saves the replaced module's own state under its name (the
# `modules_to_save.<adapter>` level is removed on save).
_HEAD_KEY = _PREFIX + "score.weight"
# Names peft puts in modules_to_save for a classification head (SEQ_CLS adds both, whichever
# the model has); our families' heads are all `score`, so `classifier` never has a tensor.
_HEAD_MODULES = ("score", "classifier")
_EMBEDDINGS = ("embed_tokens", "lm_head")  # peft's EMBEDDING_LAYER_NAMES
_TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of those numpy reads
_EMB_WHY = "LoRA on the embeddings or the LM head is not supported"
# Base-weight-modifying initialisations: the adapter was trained against a residual base
# (W - BA), saved by peft beside it unless converted, in which case the config says True.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# adapter_config fields that do not change the forward of a plain LoRA: bookkeeping, dropout
# (training only), initialisation schemes that leave the base untouched, and what selects the
# targets (the tensors say what was targeted). VeLoRA and MiCA are peft variants whose inference
# forward is plain LoRA (VeLoRA changes the backward; MiCA freezes B).
RANDOM_WEIGHTS_KEY = "mis_serve_random_weights"  # adapters written by write_random_adapter
IGNORED_FIELDS = frozenset(
    {
        RANDOM_WEIGHTS_KEY,
        "peft_version",
        "revision",
        "inference_mode",
        "base_model_name_or_path",
        "lora_dropout",
        "exclude_modules",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "megatron_core",
        "qalora_group_size",
        "ensure_weight_tying",
        "velora_config",
        "runtime_config",
    }
)
# Fields read for the scaling or checked below (refused when set to what we do not implement).
CHECKED_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "modules_to_save",
        "init_lora_weights",
        "bias",
        "id2label",
    }
)
# Options whose non-default value changes the forward (or the weights' meaning) and that the
# engine does not implement: field -> why. Default means null / false / empty.
REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA adapters are not supported (magnitude-rescaled weights)",
    "lora_bias": "LoRA biases on lora_B are not supported",
    "layers_to_transform": "adapters restricted to some layers by layers_to_transform are "
    "not supported",
    "layers_pattern": "layers_pattern (with layers_to_transform) is not supported",
    "fan_in_fan_out": "fan_in_fan_out is for Conv1D (GPT-2-style) weights; these models' "
    "projections are Linear",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "use_qalora": "QA-LoRA (pooled inputs) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "layer_replication": "layer replication changes the model's layers and is not supported",
    "monteclora_config": "MonteCLoRA (sampled perturbations) is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA (learned singular values, truncated base) is not supported",
}


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A loaded adapter: float32 arrays ready to place on a device."""

    path: Path
    rank: int  # the largest rank over its modules (<= max_rank); 0 for a head-only adapter
    # module -> (A [num_layers, in, rank], B [num_layers, rank, out]): x @ A @ B is the
    # module's LoRA term, scaling already in B. Untargeted modules are absent, untargeted
    # layers and ranks below `rank` are exact zeros (they add nothing, and one shape per
    # module lets adapters of different ranks share a batch).
    lora: dict[str, tuple[np.ndarray, np.ndarray]]
    head: np.ndarray | None  # classification head [num_labels, hidden] (modules_to_save)
    num_labels: int  # classes the adapter scores with (base's without a head; 0 = LM head)
    class_labels: tuple[str, ...]
    base_model: str | None  # base_model_name_or_path (informational: paths differ by machine)


def adapter_bytes(adapter: LoraAdapter) -> int:
    """Device memory the adapter's arrays take (for reporting and budgeting)."""
    total = sum(a.nbytes + b.nbytes for a, b in adapter.lora.values())
    return total + (adapter.head.nbytes if adapter.head is not None else 0)


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """peft's get_pattern_key: the first pattern (dict order) that matches the end of the
    module's full name at a dot boundary, as a regex."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _read_config(path: Path) -> dict[str, Any]:
    file = _regular(path / CONFIG_FILE)
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


class AdapterFileError(FileNotFoundError, ValueError):
    """A missing adapter file: a FileNotFoundError like a missing checkpoint file, and a
    ValueError like every other refusal of an adapter."""


def _missing(file: Path) -> AdapterFileError:
    hint = ""
    if file.name == WEIGHTS_FILE and (file.parent / "adapter_model.bin").is_file():
        hint = " (adapter_model.bin is a PyTorch pickle, not read: save with safe_serialization)"
    return AdapterFileError(f"{file} does not exist{hint}")


def _check_config(config: dict[str, Any]) -> None:
    """Refuse every option that changes the computation and is not implemented."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"peft_type: {peft_type!r} is not supported (only 'LORA')")
    task_type = config.get("task_type")
    if task_type not in _TASK_TYPES:
        raise ValueError(
            f"task_type: {task_type!r} is not supported (a causal LM or sequence classifier: "
            f"{_TASK_TYPES})"
        )
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and not base_class.endswith(("ForCausalLM", "ForSequenceClassification")):
        raise ValueError(
            f"auto_mapping: base_model_class {base_class!r} is not a causal LM or a sequence "
            "classifier"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"bias: {bias!r} is not supported (base biases trained with the adapter)")
    for field, why in REFUSED_FIELDS.items():
        if not _is_default(config.get(field)):
            raise ValueError(f"{field}: {why} (got {config[field]!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"init_lora_weights: {init!r} adapters apply to a base modified at initialisation; "
            "convert it to a plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        hits = [m for m in ("model.embed_tokens", "lm_head") if re.fullmatch(targets, m)]
        if hits:
            raise ValueError(f"target_modules: {targets!r} matches {hits[0]!r}: {_EMB_WHY}")
    elif targets:
        for t in targets:
            if t.rsplit(".", 1)[-1] in _EMBEDDINGS:
                raise ValueError(f"target_modules: {t!r}: {_EMB_WHY}")
    for module in config.get("modules_to_save") or ():
        if module not in _HEAD_MODULES:
            raise ValueError(
                f"modules_to_save: {module!r} is not supported (only the classification head, "
                "'score')"
            )
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r: {r!r} must be a positive integer")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"{field}: expected a mapping of module patterns to values")
    unknown = sorted(
        k
        for k, v in config.items()
        if k not in IGNORED_FIELDS | CHECKED_FIELDS | REFUSED_FIELDS.keys() and not _is_default(v)
    )
    if unknown:
        # A field this loader does not know (a newer peft) set away from its default may change
        # the forward; refusing is the only way not to serve different scores than trained.
        raise ValueError(
            f"{unknown[0]}: unknown adapter_config field set to {config[unknown[0]]!r} (this "
            "loader cannot tell whether it changes the computation)"
        )


def lora_features(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) features of the HF Linear `module`."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }[module]


def _unmatched(name: str) -> ValueError:
    if "lora_embedding_" in name or any(f".{e}." in f".{name}" for e in _EMBEDDINGS):
        return ValueError(f"tensor {name!r}: {_EMB_WHY} (nor embedding weights in an adapter)")
    if name.startswith(_PREFIX + "score.lora_"):
        return ValueError(f"tensor {name!r}: LoRA on the classification head is not supported")
    return ValueError(f"tensor {name!r} matches no module of this model")


def _regular(file: Path) -> Path:
    """`file`, if it is a regular file: a FIFO or a device would block its reader (a FIFO
    with no writer never returns), so neither is opened."""
    if not file.exists():
        raise _missing(file)
    if not file.is_file():
        raise ValueError(f"{file}: not a regular file")
    return file


def _tensor_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) from the file's header alone, no tensor read: every
    shape is checked before the data (a file of any size costs nothing to refuse)."""
    _regular(file)
    try:
        # safetensors rejects a header naming one tensor twice (its data offsets no longer
        # tile the buffer), so every name below is unique; and its offsets tile the file
        # exactly, so the shapes bound what reading it costs.
        with safe_open(str(file), framework="np") as f:
            header = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                part = f.get_slice(name)
                header[name] = (tuple(part.get_shape()), part.get_dtype())
    except Exception as e:  # SafetensorError: a truncated or corrupt file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    for name, (_, dtype) in header.items():
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not one of {_FLOAT_DTYPES}")
    return header


def _read_tensors(
    file: Path, header: dict[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """The tensors of `file`, which must be those `header` (_tensor_shapes) checked: a file
    rewritten between the two reads is refused, never loaded with shapes nobody checked."""
    _regular(file)
    try:
        with safe_open(str(file), framework="np") as f:
            found = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
            now = {n: (tuple(t.get_shape()), t.get_dtype()) for n, t in found.items()}
            if now != header:
                raise ValueError(f"{file}: changed while being read (its tensors differ)")
            return {name: f.get_tensor(name) for name in found}
    except ValueError:
        raise
    except Exception as e:  # SafetensorError: a truncated or corrupt file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def load_adapter(
    path: str | Path,
    cfg: ModelConfig,
    max_rank: int = DEFAULT_MAX_RANK,
    before_read: Callable[[], None] | None = None,
) -> LoraAdapter:
    """Read the peft adapter directory `path` for the base model `cfg`; ValueError naming the
    adapter_config field or tensor at fault for anything not supported or inconsistent. Its
    config and its weights file's header are checked first; `before_read` runs then, before
    any tensor is read."""
    path = Path(path)
    config = _read_config(path)
    if config.get(RANDOM_WEIGHTS_KEY):
        log.warning("*** adapter %s holds RANDOM WEIGHTS: its scores are meaningless ***", path)
    _check_config(config)
    shapes = _tensor_shapes(path / WEIGHTS_FILE)
    r, alpha = config["r"], config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    pairs: dict[tuple[str, int], dict[str, str]] = {}  # (module, layer) -> half -> tensor name
    head_shape = None
    for name, (shape, _) in shapes.items():
        if name == _HEAD_KEY:
            head_shape = shape
            continue
        m = _LORA_KEY.fullmatch(name)
        if (
            m is None
            or _PARENT.get(m[3]) != m[2]
            or int(m[1]) >= cfg.num_layers
            or str(int(m[1])) != m[1]  # "01" would be another module for peft
        ):
            raise _unmatched(name)
        pairs.setdefault((m[3], int(m[1])), {})[m[4]] = name

    # Per (module, layer): the names of A and B, and the rank and scaling peft gave the
    # module, A's and B's shapes checked against the rank (before any tensor is read).
    found: dict[tuple[str, int], tuple[str, str, int, float]] = {}
    for (module, layer), ab in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        full = f"model.layers.{layer}.{_PARENT[module]}.{module}"
        key_of = f"{_PREFIX}{full}.lora_{{}}.weight"
        for half, other in (("A", "B"), ("B", "A")):
            if half not in ab:
                raise ValueError(
                    f"tensor {key_of.format(half)!r} is missing (its lora_{other} is present)"
                )
        r_key = _pattern_key(rank_pattern, full)
        rank_field = f"rank_pattern: {r_key!r}" if r_key is not None else "r"
        rank = rank_pattern[r_key] if r_key is not None else r
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{rank_field}: {rank!r} must be a positive integer")
        if rank > max_rank:
            raise ValueError(f"{rank_field}: {rank} exceeds max_rank={max_rank}")
        a_in, b_out = lora_features(cfg, module)
        for half, want in (("A", (rank, a_in)), ("B", (b_out, rank))):
            if (got := shapes[ab[half]][0]) != want:
                raise ValueError(
                    f"tensor {key_of.format(half)!r} has shape {list(got)}, expected "
                    f"{list(want)} (rank {rank} from {rank_field})"
                )
        a_key = _pattern_key(alpha_pattern, full)
        lora_alpha = alpha_pattern[a_key] if a_key is not None else alpha
        if not isinstance(lora_alpha, int | float) or isinstance(lora_alpha, bool):
            field = f"alpha_pattern: {a_key!r}" if a_key is not None else "lora_alpha"
            raise ValueError(f"{field}: {lora_alpha!r} must be a number")
        # peft's LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) (rank-stabilised).
        scale = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        found[(module, layer)] = (ab["A"], ab["B"], rank, scale)

    class_labels = _class_labels(head_shape, cfg, config)
    if not found and head_shape is None:
        raise ValueError(f"{path / WEIGHTS_FILE}: holds no LoRA or classification head tensor")
    if before_read is not None:
        before_read()
        if _read_config(path) != config:  # the config checked is the one before_read saw
            raise ValueError(f"{path / CONFIG_FILE}: changed while being read")
    tensors = _read_tensors(path / WEIGHTS_FILE, shapes)
    max_r = max((rank for _, _, rank, _ in found.values()), default=0)
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in LORA_MODULES:
        layers = [(layer, v) for (m, layer), v in found.items() if m == module]
        if not layers:
            continue
        a_in, b_out = lora_features(cfg, module)
        stack_a = np.zeros((cfg.num_layers, a_in, max_r), np.float32)
        stack_b = np.zeros((cfg.num_layers, max_r, b_out), np.float32)
        for layer, (a_name, b_name, rank, scale) in layers:
            a, b = tensors[a_name], tensors[b_name]
            stack_a[layer, :, :rank] = a.astype(np.float32).T
            # Scaled in float64 and rounded once: peft rounds (x A^T B^T) * s in the adapter's
            # dtype, a pre-multiplied B cannot do better than one rounding of B * s.
            stack_b[layer, :rank, :] = (b.astype(np.float64).T * scale).astype(np.float32)
        lora[module] = (stack_a, stack_b)

    head = tensors.get(_HEAD_KEY)
    if head is not None:
        head = np.ascontiguousarray(head.astype(np.float32))
    return LoraAdapter(
        path=path,
        rank=max_r,
        lora=lora,
        head=head,
        num_labels=len(class_labels),
        class_labels=class_labels,
        base_model=config.get("base_model_name_or_path"),
    )


def _class_labels(
    head_shape: tuple[int, ...] | None, cfg: ModelConfig, config: dict[str, Any]
) -> tuple[str, ...]:
    """The classes an adapter scores with: its own head's (modules_to_save), named by its
    id2label, or the base's."""
    num_labels, class_labels = cfg.num_labels, cfg.class_labels
    if head_shape is not None:
        if len(head_shape) != 2 or head_shape[1] != cfg.hidden_size or head_shape[0] < 1:
            raise ValueError(
                f"tensor {_HEAD_KEY!r} has shape {list(head_shape)}, expected "
                f"[num_labels, {cfg.hidden_size}]"
            )
        num_labels = head_shape[0]
        if num_labels != cfg.num_labels:  # the base's labels name other classes
            class_labels = tuple(f"LABEL_{i}" for i in range(num_labels))
    id2label = config.get("id2label")
    if id2label:
        if len(id2label) != num_labels or set(id2label) != {str(i) for i in range(num_labels)}:
            raise ValueError(
                f"id2label: {len(id2label)} labels (keys {sorted(id2label)}) for a head of "
                f"{num_labels} classes"
            )
        class_labels = tuple(str(id2label[str(i)]) for i in range(num_labels))
    return class_labels


def adapter_classes(path: str | Path, cfg: ModelConfig) -> tuple[str, ...]:
    """The class labels the adapter at `path` scores with on the base `cfg` (its own head's or
    the base's; () for an LM head), from its config and its head's shape alone: what a
    process that routes requests needs, without reading the weights."""
    path = Path(path)
    config = _read_config(path)
    head = _tensor_shapes(path / WEIGHTS_FILE).get(_HEAD_KEY)
    return _class_labels(None if head is None else head[0], cfg, config)


def adapter_digest(path: str | Path) -> str:
    """SHA-256 of an adapter directory's two files: what a replica reads is what was checked
    (a directory rewritten in place is another adapter)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(_regular(path / name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_checked_adapter(
    path: str | Path, cfg: ModelConfig, max_rank: int, digest: str | None = None
) -> tuple[LoraAdapter, str]:
    """load_adapter, and the digest of the files it read (ValueError if they changed while
    read, or differ from `digest`). Without `digest` (the ingress's first check), the digest is
    taken once the config and the weights' header passed: a file of the wrong shapes is
    refused unread, whatever its size."""
    taken: list[str] = []

    def take_digest() -> None:
        taken.append(adapter_digest(path))
        if digest is not None and taken[0] != digest:
            raise ValueError(
                f"{path}: its files changed since the ingress checked them (sha256 "
                f"{digest[:12]}, now {taken[0][:12]}); name it again in the user_config to "
                "serve the new files"
            )

    # Files the ingress checked (`digest`): whether they still are is said first.
    if digest is not None:
        take_digest()
    adapter = load_adapter(path, cfg, max_rank, None if taken else take_digest)
    if adapter_digest(path) != taken[0]:
        raise ValueError(f"{path}: its files changed while being read")
    return adapter, taken[0]


def head_width(cfg: ModelConfig, heads: Iterable[int]) -> int:
    """The classes an engine's adapter heads program is as wide as, started on the base `cfg`
    with adapters whose own heads have `heads` classes: the base's or the widest (0: none)."""
    return max([cfg.num_labels, *heads])


def check_head_room(adapter: LoraAdapter, width: int) -> None:
    """ValueError unless `adapter`'s own head (if any) fits an engine whose head program is
    `width` classes wide (fixed at its start: a wider head needs a restart)."""
    if adapter.head is not None and adapter.num_labels > width:
        room = f"adapter heads of up to {width} classes" if width else "no adapter heads"
        raise ValueError(
            f"modules_to_save: {adapter.path}'s head has {adapter.num_labels} classes; the "
            f"engine started with {room} (its head program's width): restart it with this "
            "adapter configured"
        )


def write_random_adapter(
    cfg: ModelConfig,
    out: str | Path,
    *,
    rank: int = 16,
    seed: int = 0,
    modules: tuple[str, ...] = LORA_MODULES,
    scale: float = 0.05,
) -> Path:
    """A RANDOM-WEIGHT LoRA adapter in peft's format (the files `load_adapter` reads and peft
    writes), for benchmarks and demos on machines without torch or peft: every module's A and
    B normal(0, scale), lora_alpha = 2 * rank. Its scores mean nothing."""
    import safetensors.numpy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in modules:
            fan_in, fan_out = lora_features(cfg, module)
            name = f"{_PREFIX}model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, scale, (rank, fan_in))
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, scale, (fan_out, rank))
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        RANDOM_WEIGHTS_KEY: True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out
