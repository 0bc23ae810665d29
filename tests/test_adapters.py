"""LoRA adapters written by peft (`get_peft_model(...).save_pretrained`) on checkpoints
transformers reads: loaded strictly into stacked, pre-scaled arrays, or refused naming the field
or tensor at fault.

The reference for every number is peft itself: each saved adapter comes with the scaling peft
gave each module and its `get_delta_weight` (scaling * B @ A), which the loaded A @ B must equal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import adapters
from models.adapters import (
    CHECKED_FIELDS,
    IGNORED_FIELDS,
    LORA_MODULES,
    REFUSED_FIELDS,
    adapter_bytes,
    adapter_classes,
    load_adapter,
    load_checked_adapter,
)
from models.checkpoint import make_random_checkpoint, read_hf_config
from models.config import from_hf_config

LM_TARGETS = list(LORA_MODULES)
Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@dataclasses.dataclass(frozen=True)
class Saved:
    """An adapter peft wrote, and what peft computes with it: per LoRA module (full name,
    e.g. model.layers.0.self_attn.q_proj) its scaling and delta weight [out, in]."""

    path: Path
    scaling: dict[str, float]
    delta: dict[str, np.ndarray]
    head: np.ndarray | None


def _save(base: str, config, out: Path, num_labels: int | None = None, seed: int = 0) -> Saved:
    """get_peft_model on the checkpoint `base` (a sequence classifier with `num_labels`
    classes when given), LoRA B drawn at random (peft starts it at zero), saved to `out`."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(base)
    else:  # the base's head replaced when its class count differs (a new, random `score`)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    peft_model = get_peft_model(model, config)
    scaling, delta = {}, {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer):
                torch.nn.init.normal_(module.lora_B["default"].weight)
                full = name.removeprefix("base_model.model.")
                scaling[full] = module.scaling["default"]
                delta[full] = module.get_delta_weight("default").double().numpy()
    peft_model.save_pretrained(out)
    score = getattr(peft_model.base_model.model, "score", None)
    head = None if score is None else score.modules_to_save["default"].weight.detach().numpy()
    return Saved(out, scaling, delta, None if head is None else head.copy())


@pytest.fixture(scope="module")
def bases(ckpts, tmp_path_factory) -> dict[str, str]:
    """Base checkpoints: the session's Qwen3 LM, a 1-class Llama 3 classifier (non-Qwen)."""
    root = tmp_path_factory.mktemp("adapter-bases")
    return {
        "qwen3": ckpts["qwen3"],
        "llama-cls": str(make_random_checkpoint("llama3-tiny-cls", root / "llama-cls", seed=5)),
    }


@pytest.fixture(scope="module")
def cfgs(bases):
    return {name: from_hf_config(read_hf_config(path)) for name, path in bases.items()}


@pytest.fixture(scope="module")
def saved(bases, tmp_path_factory) -> dict[str, Saved]:
    """Every peft adapter the tests read, written once for the module."""
    from peft import IA3Config, LoraConfig, TaskType

    root = tmp_path_factory.mktemp("adapters")
    lm, cls = bases["qwen3"], bases["llama-cls"]
    return {
        # All 7 modules; a rank_pattern (one layer's k_proj, every up_proj) and an
        # alpha_pattern (every down_proj).
        "full": _save(
            lm,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=LM_TARGETS,
                rank_pattern={"model.layers.1.self_attn.k_proj": 4, "up_proj": 2},
                alpha_pattern={"down_proj": 4},
            ),
            root / "full",
        ),
        "rslora": _save(
            lm,
            LoraConfig(
                r=8,
                lora_alpha=16,
                use_rslora=True,
                target_modules=["q_proj", "v_proj"],
                rank_pattern={"v_proj": 4},
            ),
            root / "rslora",
            seed=1,
        ),
        # A regex string: q and v of layer 0 only.
        "regex": _save(
            lm,
            LoraConfig(r=4, lora_alpha=4, target_modules=r"model\.layers\.0\.self_attn\.[qv]_proj"),
            root / "regex",
            seed=2,
        ),
        # SEQ_CLS on the 1-class Llama classifier, retrained with 3 classes: modules_to_save
        # gets ["classifier", "score"] from the task type.
        "cls": _save(
            cls,
            LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["o_proj", "gate_proj"]),
            root / "cls",
            num_labels=3,
            seed=3,
        ),
        # The Qwen3 LM turned into a 2-class classifier by its adapter.
        "lm-to-cls": _save(
            lm,
            LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"]),
            root / "lm-to-cls",
            num_labels=2,
            seed=4,
        ),
        "dora": _save(lm, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), root / "dora"),
        "layers": _save(
            lm,
            LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]),
            root / "layers",
        ),
        "ia3": _save(
            lm,
            IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            root / "ia3",
        ),
    }


def _split(full: str) -> tuple[int, str]:
    m = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)", full)
    assert m, full
    return int(m[1]), m[2]


def _check_against_peft(adapter, s: Saved, cfg) -> None:
    """Per module peft wrapped: loaded A @ B == peft's delta weight (transposed); every other
    (module, layer) exactly zero."""
    targeted = {_split(full) for full in s.delta}
    assert set(adapter.lora) == {m for _, m in targeted}
    for module, (a, b) in adapter.lora.items():
        assert a.dtype == b.dtype == np.float32
        assert a.shape[0] == b.shape[0] == cfg.num_layers
        assert a.shape[2] == b.shape[1] == adapter.rank
        for layer in range(cfg.num_layers):
            if (layer, module) not in targeted:
                assert not a[layer].any() and not b[layer].any()
    for full, delta in s.delta.items():
        layer, module = _split(full)
        a, b = adapter.lora[module]
        got = a[layer].astype(np.float64) @ b[layer].astype(np.float64)
        np.testing.assert_allclose(got, delta.T, rtol=1e-5, atol=1e-6 * np.abs(delta).max())


def test_full_target_round_trips_with_patterns(saved, cfgs, bases):
    s, cfg = saved["full"], cfgs["qwen3"]
    adapter = load_adapter(s.path, cfg)
    assert adapter.path == s.path and adapter.base_model == bases["qwen3"]
    assert adapter.rank == 8 and adapter.head is None
    assert adapter.num_labels == 0 and adapter.class_labels == ()
    _check_against_peft(adapter, s, cfg)
    # Scaling by hand (alpha / r after the patterns), and it is peft's.
    want = {
        "model.layers.0.self_attn.q_proj": (8, 16 / 8),
        "model.layers.1.self_attn.k_proj": (4, 16 / 4),  # rank_pattern, full name
        "model.layers.0.self_attn.k_proj": (8, 16 / 8),
        "model.layers.1.mlp.up_proj": (2, 16 / 2),  # rank_pattern, suffix
        "model.layers.0.mlp.down_proj": (8, 4 / 8),  # alpha_pattern
        "model.layers.1.self_attn.o_proj": (8, 16 / 8),
    }
    tensors = load_file(s.path / "adapter_model.safetensors")
    for full, (rank, scale) in want.items():
        assert s.scaling[full] == pytest.approx(scale)
        layer, module = _split(full)
        a, b = adapter.lora[module]
        saved_a = tensors[f"base_model.model.{full}.lora_A.weight"]
        saved_b = tensors[f"base_model.model.{full}.lora_B.weight"]
        assert saved_a.shape[0] == rank
        np.testing.assert_array_equal(a[layer, :, :rank], saved_a.T)
        np.testing.assert_allclose(b[layer, :rank, :], saved_b.T * scale, rtol=1e-7)
        # Ranks below the adapter's are exact zeros (they add nothing in a shared batch).
        assert not a[layer, :, rank:].any() and not b[layer, rank:, :].any()
    # HF Linear features: q_proj in=hidden, out=heads*head_dim; down_proj in=intermediate.
    assert adapter.lora["q_proj"][0].shape == (2, 64, 8)
    assert adapter.lora["q_proj"][1].shape == (2, 8, 64)
    assert adapter.lora["k_proj"][1].shape == (2, 8, 32)
    assert adapter.lora["down_proj"][0].shape == (2, 128, 8)
    nbytes = sum(a.nbytes + b.nbytes for a, b in adapter.lora.values())
    assert adapter_bytes(adapter) == nbytes


def test_rslora_scaling(saved, cfgs):
    s = saved["rslora"]
    adapter = load_adapter(s.path, cfgs["qwen3"])
    assert s.scaling["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / math.sqrt(8))
    assert s.scaling["model.layers.1.self_attn.v_proj"] == pytest.approx(16 / math.sqrt(4))
    assert set(adapter.lora) == {"q_proj", "v_proj"} and adapter.rank == 8
    _check_against_peft(adapter, s, cfgs["qwen3"])


def test_regex_target_some_layers(saved, cfgs):
    s = saved["regex"]
    assert set(s.delta) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    adapter = load_adapter(s.path, cfgs["qwen3"])
    assert set(adapter.lora) == {"q_proj", "v_proj"} and adapter.rank == 4
    a, b = adapter.lora["v_proj"]
    assert a[0].any() and b[0].any() and not a[1].any() and not b[1].any()
    _check_against_peft(adapter, s, cfgs["qwen3"])


def test_classification_head_with_other_class_count(saved, cfgs):
    """A SEQ_CLS adapter whose head has 3 classes on a 1-class base (Llama: a non-Qwen
    family): the head and the class count are the adapter's."""
    s, cfg = saved["cls"], cfgs["llama-cls"]
    config = json.loads((s.path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "score"]
    assert "base_model.model.score.weight" in load_file(s.path / "adapter_model.safetensors")
    adapter = load_adapter(s.path, cfg)
    assert cfg.num_labels == 1 and adapter.num_labels == 3
    assert adapter.class_labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    # What the ingress reads of it (the config and the head's shape, not the weights).
    assert adapter_classes(s.path, cfg) == adapter.class_labels
    assert adapter_classes(saved["full"].path, cfgs["qwen3"]) == ()
    np.testing.assert_array_equal(adapter.head, s.head)
    assert adapter.head.shape == (3, 64) and adapter.head.dtype == np.float32
    _check_against_peft(adapter, s, cfg)
    assert adapter_bytes(adapter) == adapter.head.nbytes + sum(
        a.nbytes + b.nbytes for a, b in adapter.lora.values()
    )
    # A base with as many classes keeps its label names.
    named = dataclasses.replace(cfg, num_labels=3, class_labels=("x", "y", "z"))
    assert load_adapter(s.path, named).class_labels == ("x", "y", "z")
    assert adapter_classes(s.path, named) == ("x", "y", "z")


def test_lm_base_turned_classifier(saved, cfgs):
    s = saved["lm-to-cls"]
    adapter = load_adapter(s.path, cfgs["qwen3"])
    assert cfgs["qwen3"].num_labels == 0
    assert adapter.num_labels == 2 and adapter.class_labels == ("LABEL_0", "LABEL_1")
    np.testing.assert_array_equal(adapter.head, s.head)
    _check_against_peft(adapter, s, cfgs["qwen3"])


def _copy(s: Saved, dst: Path, config_edit=None, tensor_edit=None) -> Path:
    shutil.copytree(s.path, dst)
    if config_edit is not None:
        file = dst / "adapter_config.json"
        config = json.loads(file.read_text())
        config_edit(config)
        file.write_text(json.dumps(config))
    if tensor_edit is not None:
        file = dst / "adapter_model.safetensors"
        tensors = load_file(file)
        tensor_edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_id2label_from_adapter_config(saved, cfgs, tmp_path):
    labels = {"0": "bad", "1": "ok", "2": "good"}
    path = _copy(saved["cls"], tmp_path / "a", lambda c: c.update(id2label=labels))
    assert load_adapter(path, cfgs["llama-cls"]).class_labels == ("bad", "ok", "good")
    path = _copy(saved["cls"], tmp_path / "b", lambda c: c.update(id2label={"0": "x"}))
    with pytest.raises(ValueError, match=r"^id2label: 1 labels"):
        load_adapter(path, cfgs["llama-cls"])


def test_bfloat16_adapter(saved, cfgs, tmp_path):
    """Adapters trained in bfloat16 are saved so; they load as float32 (exact widening)."""
    bf16 = ml_dtypes.bfloat16
    path = _copy(
        saved["regex"],
        tmp_path / "bf16",
        tensor_edit=lambda t: t.update({k: v.astype(bf16) for k, v in t.items()}),
    )
    adapter = load_adapter(path, cfgs["qwen3"])
    a = load_file(path / "adapter_model.safetensors")[Q_KEY.format("A")]
    assert a.dtype == bf16
    np.testing.assert_array_equal(adapter.lora["q_proj"][0][0], a.astype(np.float32).T)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dora", r"^use_dora: DoRA adapters are not supported"),
        ("layers", r"^layers_to_transform: "),
        ("ia3", r"^peft_type: 'IA3' is not supported"),
    ],
)
def test_peft_written_refusals(saved, cfgs, name, message):
    with pytest.raises(ValueError, match=message):
        load_adapter(saved[name].path, cfgs["qwen3"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (dict(bias="all"), r"^bias: 'all' is not supported"),
        (dict(bias="lora_only"), r"^bias: 'lora_only'"),
        (dict(target_modules=["q_proj", "embed_tokens"]), r"^target_modules: 'embed_tokens'"),
        (dict(target_modules=["lm_head"]), r"^target_modules: 'lm_head'"),
        (dict(target_modules=r".*(embed_tokens|q_proj)"), r"^target_modules: .*embed_tokens"),
        (dict(modules_to_save=["lm_head"]), r"^modules_to_save: 'lm_head'"),
        (dict(task_type="TOKEN_CLS"), r"^task_type: 'TOKEN_CLS'"),
        (dict(peft_type="LOHA"), r"^peft_type: 'LOHA'"),
        (dict(lora_bias=True), r"^lora_bias: "),
        (dict(use_qalora=True), r"^use_qalora: "),
        (dict(fan_in_fan_out=True), r"^fan_in_fan_out: "),
        (dict(layers_pattern="layers", layers_to_transform=0), r"^layers_to_transform: "),
        (dict(trainable_token_indices=[1, 2]), r"^trainable_token_indices: "),
        (dict(target_parameters=["mlp.experts.down_proj"]), r"^target_parameters: "),
        (dict(alora_invocation_tokens=[5, 6]), r"^alora_invocation_tokens: "),
        (dict(megatron_config={"tp": 2}), r"^megatron_config: "),
        (dict(layer_replication=[[0, 2], [1, 2]]), r"^layer_replication: "),
        (dict(init_lora_weights="pissa_niter_4"), r"^init_lora_weights: 'pissa_niter_4'"),
        (dict(init_lora_weights="olora"), r"^init_lora_weights: 'olora'"),
        (dict(use_sparse_lora=True), r"^use_sparse_lora: unknown adapter_config field"),
        (dict(r=0), r"^r: 0 must be a positive integer"),
        (
            dict(auto_mapping={"base_model_class": "Qwen3ForTokenClassification"}),
            r"^auto_mapping: ",
        ),
    ],
)
def test_config_refusals(saved, cfgs, tmp_path, edit, message):
    path = _copy(saved["full"], tmp_path / "bad", lambda c: c.update(edit))
    with pytest.raises(ValueError, match=message):
        load_adapter(path, cfgs["qwen3"])


def test_harmless_fields_accepted(saved, cfgs, tmp_path):
    """Options that do not change the forward (dropout, init schemes that leave the base
    alone, exclusions, a VeLoRA backward) load."""
    edit = dict(
        lora_dropout=0.1,
        init_lora_weights="gaussian",
        exclude_modules=["lm_head"],
        velora_config={"num_groups": 4},
        inference_mode=False,
        revision="main",
    )
    path = _copy(saved["regex"], tmp_path / "ok", lambda c: c.update(edit))
    assert set(load_adapter(path, cfgs["qwen3"]).lora) == {"q_proj", "v_proj"}


def test_rank_limits(saved, cfgs, tmp_path):
    with pytest.raises(ValueError, match=r"^r: 8 exceeds max_rank=4$"):
        load_adapter(saved["full"].path, cfgs["qwen3"], max_rank=4)
    assert load_adapter(saved["full"].path, cfgs["qwen3"], max_rank=8).rank == 8
    path = _copy(saved["full"], tmp_path / "bad", lambda c: c["rank_pattern"].update(up_proj=80))
    with pytest.raises(ValueError, match=r"^rank_pattern: 'up_proj': 80 exceeds max_rank=64$"):
        load_adapter(path, cfgs["qwen3"])


def _zeros(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.update({"base_model.model.foo.lora_A.weight": _zeros(8, 64)}),
            r"^tensor 'base_model\.model\.foo\.lora_A\.weight' matches no module of this model$",
        ),
        (  # a layer past the model's
            lambda t: t.update(
                {k.replace("layers.0.", "layers.2."): v for k, v in t.items() if "layers.0." in k}
            ),
            r"^tensor 'base_model\.model\.model\.layers\.2\..*' matches no module",
        ),
        (  # a projection under the wrong parent
            lambda t: t.update(
                {"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": _zeros(8, 64)}
            ),
            r"^tensor 'base_model\.model\.model\.layers\.0\.mlp\.q_proj\.lora_A\.weight' matches",
        ),
        (
            lambda t: t.update(
                {"base_model.model.model.embed_tokens.lora_embedding_A": _zeros(8, 151936)}
            ),
            r"^tensor 'base_model\.model\.model\.embed_tokens\.lora_embedding_A': LoRA on the emb",
        ),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": _zeros(8, 64)}),
            r"^tensor 'base_model\.model\.lm_head\.lora_A\.weight': LoRA on the embeddings",
        ),
        (
            lambda t: t.update({"base_model.model.score.lora_A.weight": _zeros(8, 64)}),
            r"^tensor 'base_model\.model\.score\.lora_A\.weight': LoRA on the classification",
        ),
        (
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.q_proj.bias": _zeros(64)}
            ),
            r"^tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.bias' matches no",
        ),
        (
            lambda t: t.update({Q_KEY.format("A"): t[Q_KEY.format("A")][:, :63]}),
            re.escape(f"tensor '{Q_KEY.format('A')}' has shape [8, 63], expected [8, 64]"),
        ),
        (  # rank 4 in the tensors where the config says 8
            lambda t: t.update(
                {k: v[:4] if "lora_A" in k else v[:, :4] for k, v in t.items() if "q_proj" in k}
            ),
            re.escape(f"tensor '{Q_KEY.format('A')}' has shape [4, 64], expected [8, 64]"),
        ),
        (
            lambda t: t.pop(Q_KEY.format("B")),
            re.escape(f"tensor '{Q_KEY.format('B')}' is missing (its lora_A is present)"),
        ),
        (
            lambda t: t.update({"base_model.model.score.weight": _zeros(3, 32)}),
            re.escape("tensor 'base_model.model.score.weight' has shape [3, 32], expected"),
        ),
    ],
)
def test_tensor_refusals(saved, cfgs, tmp_path, edit, message, monkeypatch):
    path = _copy(saved["full"], tmp_path / "bad", tensor_edit=edit)
    # From the file's header alone: no tensor of a refused adapter is read.
    monkeypatch.setattr(adapters, "_read_tensors", lambda *a: pytest.fail(f"read {a}"))
    with pytest.raises(ValueError, match=message):
        load_adapter(path, cfgs["qwen3"])


def test_a_huge_weights_file_of_the_wrong_shape_is_refused_from_its_header(
    saved, cfgs, tmp_path, monkeypatch
):
    """A 4 GiB tensor (a sparse file: nothing of it is on disk) is refused by its declared
    shape, before anything of it is read, in the ingress's check as in the engine's load."""
    path = _copy(saved["full"], tmp_path / "huge")
    huge, b = 2**32, 64 * 8 * 4  # lora_A [8, 2**27] and lora_B [64, 8] of q_proj, float32
    header = json.dumps(
        {
            Q_KEY.format("A"): {"dtype": "F32", "shape": [8, 2**27], "data_offsets": [0, huge]},
            Q_KEY.format("B"): {"dtype": "F32", "shape": [64, 8], "data_offsets": [huge, huge + b]},
        }
    )
    header += " " * (-len(header) % 8)
    with open(path / "adapter_model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + huge + b)
    for unread in ("_read_tensors", "adapter_digest"):
        monkeypatch.setattr(adapters, unread, lambda *a: pytest.fail(f"read {a}"))
    want = re.escape(f"tensor '{Q_KEY.format('A')}' has shape [8, 134217728], expected [8, 64]")
    with pytest.raises(ValueError, match=want):
        load_checked_adapter(path, cfgs["qwen3"], 64)


def test_weights_rewritten_between_their_check_and_their_read_are_refused(saved, cfgs, tmp_path):
    """The tensors read must be those whose shapes were checked: a file rewritten after its
    header passed (here: rank 4 where the config says 8) is refused, not spread over the
    checked rank."""
    path = _copy(saved["full"], tmp_path / "a")
    other = _copy(
        saved["full"],
        tmp_path / "b",
        tensor_edit=lambda t: t.update(
            {k: v[:4] if "lora_A" in k else v[:, :4] for k, v in t.items() if "q_proj" in k}
        ),
    )
    swap = lambda: shutil.copy(other / "adapter_model.safetensors", path)  # noqa: E731
    with pytest.raises(ValueError, match="changed while being read"):
        load_adapter(path, cfgs["qwen3"], before_read=swap)
    # The same for its config: the one checked must be the one the digest was taken of.
    path = _copy(saved["full"], tmp_path / "c")
    edited = _copy(saved["full"], tmp_path / "d", lambda c: c.update(lora_alpha=3))
    swap = lambda: shutil.copy(edited / "adapter_config.json", path)  # noqa: E731
    with pytest.raises(ValueError, match=r"adapter_config\.json: changed while being read"):
        load_adapter(path, cfgs["qwen3"], before_read=swap)


def _raised_within(seconds: float, fn, *args) -> BaseException | None:
    """What fn(*args) raised (None: nothing), run in a daemon thread: one still blocked after
    `seconds` fails the test instead of hanging it."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            raised[0] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"{fn.__name__}{args} blocked"
    return raised[0]


def test_files_that_are_no_regular_files_are_refused_not_opened(saved, cfgs, tmp_path):
    """A FIFO never returns from open() while no one writes to it: such a file is refused
    before it is opened, by every reader."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = _copy(saved["full"], tmp_path / name)
        (path / name).unlink()
        os.mkfifo(path / name)
        for read, extra in (
            (load_adapter, ()),
            (load_checked_adapter, (64,)),
            (adapter_classes, ()),
        ):
            e = _raised_within(60, read, path, cfgs["qwen3"], *extra)
            assert str(e) == f"{path / name}: not a regular file", (read, e)


def test_corrupt_weights_file(saved, cfgs, tmp_path):
    path = _copy(saved["full"], tmp_path / "a")
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable safetensors file")):
        load_adapter(path, cfgs["qwen3"])


def test_missing_files(saved, cfgs, tmp_path):
    path = _copy(saved["full"], tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}/adapter_model.safetensors")) as e:
        load_adapter(path, cfgs["qwen3"])
    assert isinstance(e.value, FileNotFoundError)
    (path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin is a PyTorch pickle"):
        load_adapter(path, cfgs["qwen3"])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/nowhere/adapter_config.json")):
        load_adapter(tmp_path / "nowhere", cfgs["qwen3"])


def test_every_lora_config_field_is_classified():
    """Every field the installed peft writes is either read, refused when set, or known not to
    change the forward: a new peft field shows up here, not as a silent difference."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    known = IGNORED_FIELDS | CHECKED_FIELDS | REFUSED_FIELDS.keys()
    assert fields - known == set()
