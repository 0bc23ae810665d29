"""The offline CLI as a user runs it: make a checkpoint, score a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from models.engine import score_ids
from tests.conftest import LABELS, random_request


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mis_score", *args], capture_output=True, text=True, timeout=600
    )


def test_make_checkpoint_and_score(tmp_path, engine):
    ckpt = tmp_path / "ck"
    made = run_cli("make-checkpoint", "--preset", "qwen3-tiny", "--out", str(ckpt), "--seed", "1")
    assert made.returncode == 0, made.stderr
    assert "RANDOM-WEIGHT" in made.stderr
    query, items = random_request(seed=40, n_items=12)
    lines = [
        json.dumps({"query": query, "items": items, "label_token_ids": LABELS}),
        "{not json",
        json.dumps(
            {
                "query": "Is it light?",
                "items": ["1 kg", "3 kg"],
                "label_token_ids": [9454, 2753],
                "apply_softmax": True,
            }
        ),
        json.dumps({"query": [1], "items": [[1]], "label_token_ids": [10**9]}),
        json.dumps({"query": [1], "items": [[1]], "label_token_ids": [1], "model": "other"}),
    ]
    (tmp_path / "req.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "resp.jsonl"
    res = run_cli(
        "score",
        "--model-path",
        str(ckpt),
        "--mode",
        "packed",
        "--max-batch-tokens",  # a request spans several forwards
        "256",
        "--max-query-tokens",
        "128",
        "--tp-size",  # split over 2 of the 4 simulated devices (conftest)
        "2",
        "--input",
        str(tmp_path / "req.jsonl"),
        "--output",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "RANDOM WEIGHTS" in res.stderr
    resp = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(resp) == len(lines)
    # Same checkpoint (seed 1 = the session's qwen3 fixture) scored in-process, serial mode.
    ref = score_ids(engine("qwen3", "serial"), query, items, LABELS)
    assert resp[0]["object"] == "scoring" and resp[0]["model"] == "ck"
    assert np.abs(np.log(resp[0]["scores"]) - np.log(ref)).max() <= 1e-4
    assert resp[0]["usage"]["prompt_tokens"] == len(query) + sum(map(len, items))
    assert resp[1]["code"] == 400 and "JSON" in resp[1]["message"]
    assert resp[2]["object"] == "scoring" and len(resp[2]["scores"]) == 2
    assert resp[3]["code"] == 400 and "label_token_ids" in resp[3]["message"]
    assert resp[4]["code"] == 404 and "model" in resp[4]["message"]


def _score_nothing(tmp_path, model_path: str, *extra: str):
    """`mis-score score` on an empty input file: only loading can fail."""
    (tmp_path / "req.jsonl").write_text("")
    inputs = ["--input", str(tmp_path / "req.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    return run_cli("score", "--model-path", model_path, *extra, *inputs)


def test_score_with_a_classifier_adapter_of_its_own_head(tmp_path):
    """`mis-score score --adapter NAME=DIR` on a 3-class classifier, the adapter peft saved
    with its own 2-class head: a line naming it answers its 2 classes under its name, as the
    engine scores them in-process; the base's line its 3; an unknown model a 404 line."""
    from models.engine import EngineConfig, ScoringEngine
    from models.inputs import Chunk
    from tests.hf_families import write_cls_adapter, write_with_transformers

    base = write_with_transformers("qwen3-tiny-cls", tmp_path / "base", seed=60)
    adapter = write_cls_adapter(base, tmp_path / "two", 61, num_labels=2, task_type="SEQ_CLS")
    query, items = random_request(seed=9, n_items=5, q_len=20)
    lines = [
        {"query": query, "items": items, "model": "two", "apply_softmax": True},
        {"query": query, "items": items},
        {"query": query, "items": [], "model": "two"},
        {"query": query, "items": items, "model": "three"},
    ]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "resp.jsonl"
    engine = {"max_batch_tokens": 1024, "max_item_tokens": 64, "max_query_tokens": 256}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine.items()]
    res = run_cli(
        "score", "--model-path", base, "--adapter", f"two={adapter}", *flags,
        "--input", str(tmp_path / "req.jsonl"), "--output", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    resp = [json.loads(line) for line in out.read_text().splitlines()]
    scorer = ScoringEngine(base, EngineConfig(max_adapters=1, **engine), {"two": adapter})
    for r, (name, soft) in zip(resp, (("two", True), (None, False)), strict=False):
        (want,) = scorer.score(
            [Chunk(tuple(query), tuple(map(tuple, items)), (), soft, adapter=name)]
        )
        assert r["model"] == (name or "base") and np.array_equal(np.asarray(r["scores"]), want)
    assert np.asarray(resp[0]["scores"]).shape == (5, 2)
    assert np.asarray(resp[1]["scores"]).shape == (5, 3)
    assert resp[2]["scores"] == [] and resp[2]["model"] == "two"
    assert resp[3]["code"] == 404 and "'three'" in resp[3]["message"]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    res = _score_nothing(tmp_path, str(tmp_path / "nope"))
    assert res.returncode == 2
    assert "config.json" in res.stderr


def test_tp_size_that_does_not_split_the_heads_is_a_clear_error(tmp_path, ckpts):
    res = _score_nothing(tmp_path, ckpts["qwen3"], "--tp-size", "3")
    assert res.returncode == 2
    assert "tp_size 3 must divide num_attention_heads 4" in res.stderr
