"""Checkpoints of every supported family written by HF transformers itself, and HF's scores on
them (the references of tests/test_families.py and tests/test_classification.py), and LoRA
adapters written by peft with transformers + peft's scores on them (tests/test_lora.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from models.checkpoint import random_hf_state
from models.config import PRESETS, ModelConfig
from models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir


def hf_model_class(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if cfg.num_labels else AutoModelForCausalLM


def write_with_transformers(
    cfg: ModelConfig | str,
    out: Path,
    *,
    seed: int,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> str:
    """`save_pretrained` of the HF model built from `cfg`'s config.json (transformers picks the
    class from `architectures`, writes its own config layout: transformers 5's) with our
    random weights (random_hf_state: scaled so scores vary far beyond test tolerances), and
    the real Qwen3 tokenizer files."""
    import torch
    from transformers import AutoConfig

    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    hf = cfg.to_hf_dict()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = hf_model_class(cfg).from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(v) for k, v in random_hf_state(cfg, seed).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # The tied LM head is the embedding (HF ties it after loading).
    assert set(missing) <= {"lm_head.weight"}, missing
    model = model.to(getattr(torch, dtype)).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    tok = bundled_tokenizer_dir()
    for fname in TOKENIZER_FILES:
        if (tok / fname).is_file():
            shutil.copy(tok / fname, Path(out) / fname)
    return str(out)


_CLASS_REFERENCE: dict[tuple, np.ndarray] = {}


def hf_class_logits(path: str, query, items, dtype=None, item_first: bool = False) -> np.ndarray:
    """HF transformers' `*ForSequenceClassification` on `query ++ item` alone, one forward per
    item: class logits [items, classes] (float64 numpy)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = dtype or torch.float32
    key = (path, str(dtype), item_first, tuple(query), tuple(map(tuple, items)))
    if key not in _CLASS_REFERENCE:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
        rows = []
        with torch.no_grad():
            for it in items:
                ids = list(it) + list(query) if item_first else list(query) + list(it)
                rows.append(model(torch.tensor([ids])).logits[0].double().numpy())
        _CLASS_REFERENCE[key] = np.array(rows)
    return _CLASS_REFERENCE[key]


def classes_from_logits(logits: np.ndarray, apply_softmax: bool) -> np.ndarray:
    """What a classification engine returns for these logits (DESIGN.md section 1)."""
    if not apply_softmax:
        return logits
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# peft's all-linear set on a decoder layer: the attention and MLP projections.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: str, out, seed: int, **lora) -> str:
    """A LoRA adapter written by peft's save_pretrained, its B matrices random (peft starts
    them at zero, which would make every adapter the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out))
    return str(out)


def peft_scores(
    base: str, adapter: str | None, query, items, labels
) -> tuple[np.ndarray, np.ndarray]:
    """transformers (+ peft, unmerged) scoring each `query ++ item` whole, float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mis_score.bench import hf_scores

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return hf_scores(model, list(query), [list(it) for it in items], labels)


def write_cls_adapter(base: str, out, seed: int, num_labels: int | None = None, **lora) -> str:
    """A peft adapter on the sequence classifier `base`: LoRA (B random), and with
    task_type SEQ_CLS its own `score` head (modules_to_save), drawn at random; `num_labels`:
    the head's classes when they differ from the base's (a new head, as transformers makes
    with ignore_mismatched_sizes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    other = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, **other)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0.0, 0.05 if "lora_B" in name else 1.0)
    peft_model.save_pretrained(str(out))
    return str(out)


def peft_class_logits(base: str, adapter: str | None, query, items) -> np.ndarray:
    """transformers' `*ForSequenceClassification` (+ peft, unmerged) on each `query ++ item`
    whole: class logits [items, classes] (float64), the adapter's own head where it has one."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    other = {}
    if adapter is not None:
        with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "np") as f:
            if "base_model.model.score.weight" in f.keys():  # noqa: SIM118
                classes = f.get_slice("base_model.model.score.weight").get_shape()[0]
                other = {"num_labels": classes, "ignore_mismatched_sizes": True}
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, **other)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        rows = [model(torch.tensor([list(query) + list(it)])).logits[0] for it in items]
    return torch.stack(rows).double().numpy()
