"""`mis-score bench`: the report's shape, the correctness gate, and that a wrong mode fails it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mis_score.cli import main
from models.engine import ScoringEngine


def _bench(ckpt: str, tmp_path, *extra: str, status: int = 0) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-path", ckpt, "--query-tokens", "40", "--items", "12"]
    argv += ["--item-tokens", "5", "--chunk-sizes", "4", "16", "--repeats", "1"]
    argv += ["--baseline-items", "4", "--json", str(out), *extra]
    assert main(argv) == status
    return json.loads(out.read_text())


def test_bench_reports_every_mode_and_transformers(ckpts, tmp_path):
    png = tmp_path / "bench.png"
    result = _bench(ckpts["qwen3"], tmp_path, "--plot", str(png), "--adapters", "2")
    rows = {(r["mode"], r["chunk_size"]): r for r in result["rows"]}
    adapters = ("prefix + 2 adapters, base only", "prefix + 2 adapters, mixed")
    assert set(rows) == {("serial", None)} | {
        (m, c) for m in ("packed-dense", "packed-segment", "prefix", *adapters) for c in (4, 16)
    }
    assert rows[adapters[1], 4]["gate_max_diff"] == 0.0  # mixed == each chunk alone, bitwise
    assert rows[adapters[1], 4]["adapter_bytes"] > 0
    for r in result["rows"] + result["transformers"]:
        assert r["status"] == "ok", r
        assert r["items_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0
        assert 0 < r["mfu"] < 1
    assert rows["serial", None]["items_timed"] == 4 and rows["prefix", 16]["items_timed"] == 12
    assert result["gate"] == {"against": "transformers float64", "bound": 1e-5}
    assert max(r["gate_max_diff"] for r in result["rows"]) <= 1e-5
    # HF transformers on the same checkpoint is the independent reference: parity bound.
    assert [r["mode"] for r in result["transformers"]] == [
        "transformers pairs",
        "transformers kv-reuse",
    ]
    assert max(r["gate_max_diff"] for r in result["transformers"]) <= 1e-4
    assert result["peak_gflops"] > 0 and result["useful_gflop_per_request"] > 0
    assert all(v is not None for v in result["ratios"].values())
    assert png.stat().st_size > 10_000


def test_a_mode_that_disagrees_with_serial_is_failed_not_ranked(ckpts, tmp_path, monkeypatch):
    real = ScoringEngine._run

    def labels_swapped(self, forward):
        label_logits, lse, own = real(self, forward)
        if self.config.mode.value != "serial":
            label_logits = label_logits[:, ::-1]
        return label_logits, lse, own

    monkeypatch.setattr(ScoringEngine, "_run", labels_swapped)
    result = _bench(
        ckpts["qwen3"], tmp_path, "--no-transformers", "--modes", "serial,prefix", status=1
    )
    status = {r["mode"]: r["status"] for r in result["rows"]}
    assert status["serial"] == "ok"
    assert status["prefix"].startswith("failed"), status
    assert all(r["items_per_s"] is None for r in result["rows"] if r["mode"] == "prefix")
    assert result["ratios"]["best_mode"] is None


def test_the_gate_passes_modes_within_the_bound_of_the_exact_scores(ckpts, tmp_path, monkeypatch):
    """Every mode is gated by its distance to the exact (float64) scores, not to serial: two
    correct float32 modes may be up to twice the bound apart. Here serial's scores move up by
    0.7e-5 and prefix's down (softmax rows still summing to 1): both stay within 1e-5 of
    float64 and pass, 1.4e-5 apart (gated against serial, prefix failed)."""
    real = ScoringEngine.score

    def nudged(self, chunks):
        shift = 7e-6 if self.config.mode.value == "serial" else -7e-6
        return [s + shift * np.array([1.0, -1.0]) for s in real(self, chunks)]

    monkeypatch.setattr(ScoringEngine, "score", nudged)
    argv = ("--no-transformers", "--modes", "serial,prefix", "--labels", "9454", "2753")
    result = _bench(ckpts["qwen3"], tmp_path, *argv)
    diffs = {r["mode"]: r["gate_max_diff"] for r in result["rows"]}
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]
    assert 6e-6 < max(diffs.values()) <= 1e-5, diffs


def test_attention_bench_checks_and_times_each_variant(tmp_path):
    from loadtests.bench_attention import main as bench_attention

    out = tmp_path / "attention.json"
    argv = ["--preset", "qwen3-tiny", "--query-tokens", "100", "--items", "6"]
    argv += ["--item-tokens", "10", "--max-batch-tokens", "256", "--json", str(out)]
    argv += ["--variants", "xla", "pallas:rows=64:tile=16", "pallas:tile=24"]
    assert bench_attention(argv) == 1  # one variant fails: the exit status says so
    result = json.loads(out.read_text())
    xla, pallas, bad = result["rows"]
    assert xla["status"] == pallas["status"] == "ok"
    assert pallas["max_diff"] <= 1e-5 and xla["max_diff"] == 0
    assert 0 < pallas["pct_of_peak"] < 100 and xla["speedup_vs_xla"] == 1
    assert bad["status"].startswith("failed") and "ms_per_layer" not in bad
    assert result["forwards"] == [256] and result["peak_gflops"] > 0


def test_attention_comparison_of_two_trees(tmp_path):
    """compare_attention against this very tree: the same bits, both timed, the JSON written;
    a baseline without the kernel is refused."""
    from pathlib import Path

    from loadtests.compare_attention import main as compare

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compare.json"
    argv = ["--preset", "qwen3-tiny", "--mode", "packed", "--query-tokens", "40", "--items", "4"]
    result = compare([*argv, "--item-tokens", "90", "--rounds", "2", "--baseline", str(root)])
    assert result["max_abs_diff"] == 0 and result["forwards"] == [1024]
    assert all(len(t) == 2 and min(t) > 0 for t in result["ms_per_round"].values())
    with pytest.raises(SystemExit, match="block_attention.py does not exist"):
        compare([*argv, "--baseline", str(tmp_path), "--json", str(out)])


def test_rag_workload_bench_against_transformers(ckpts, tmp_path):
    """`--workload rag`: Qwen3-Reranker's template around every request, documents of
    long-tailed lengths; every mode and transformers' length-sorted batches gated against
    float64, their results in item order."""
    from mis_score.workload import RagWorkload

    w = RagWorkload(items=400)
    lengths = np.concatenate([w.doc_lengths(np.random.default_rng(s)) for s in range(3)])
    assert lengths.min() >= 50 and lengths.max() == 1000 and 150 < np.median(lengths) < 250
    body = w.body(0)
    suffix = body["items"][0][-9:]
    assert all(item[-9:] == suffix for item in body["items"])
    assert body["query"][-3:] == w.body(1)["query"][-3:]  # "\n<Document>:"
    assert 10 + 70 <= len(body["query"]) <= w.query_tokens
    result = _bench(
        ckpts["qwen3"],
        tmp_path,
        *("--workload", "rag", "--items", "3", "--modes", "serial,prefix", "--hf-batch", "2"),
        *("--chunk-sizes", "3", "--baseline-items", "3", "--max-batch-tokens", "2048"),
    )
    assert result["workload_described"].startswith("RAG: Qwen3-Reranker prompt")
    assert result["workload"]["kind"] == "rag"
    for r in result["rows"] + result["transformers"]:
        assert r["status"] == "ok", r
        assert 0 < r["mfu"] < 1
    assert max(r["gate_max_diff"] for r in result["rows"]) <= 1e-5
    assert max(r["gate_max_diff"] for r in result["transformers"]) <= 1e-4
