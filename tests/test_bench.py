"""`mis-score bench`: the report's shape, the correctness gate, and that a wrong mode fails it."""

from __future__ import annotations

import json

from mis_score.cli import main
from models.engine import ScoringEngine


def _bench(ckpt: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-path", ckpt, "--query-tokens", "40", "--items", "12"]
    argv += ["--item-tokens", "5", "--chunk-sizes", "4", "16", "--repeats", "1"]
    argv += ["--baseline-items", "4", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_reports_every_mode_and_transformers(ckpts, tmp_path):
    png = tmp_path / "bench.png"
    result = _bench(ckpts["qwen3"], tmp_path, "--plot", str(png))
    rows = {(r["mode"], r["chunk_size"]): r for r in result["rows"]}
    assert set(rows) == {("serial", None)} | {
        (m, c) for m in ("packed-dense", "packed-segment", "prefix") for c in (4, 16)
    }
    for r in result["rows"] + result["transformers"]:
        assert r["status"] == "ok", r
        assert r["items_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0
        assert 0 < r["mfu"] < 1
    assert rows["serial", None]["items_timed"] == 4 and rows["prefix", 16]["items_timed"] == 12
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
        label_logits, lse = real(self, forward)
        if self.config.mode.value != "serial":
            label_logits = label_logits[:, ::-1]
        return label_logits, lse

    monkeypatch.setattr(ScoringEngine, "_run", labels_swapped)
    result = _bench(ckpts["qwen3"], tmp_path, "--no-transformers", "--modes", "serial,prefix")
    status = {r["mode"]: r["status"] for r in result["rows"]}
    assert status["serial"] == "ok"
    assert status["prefix"].startswith("failed"), status
    assert all(r["items_per_s"] is None for r in result["rows"] if r["mode"] == "prefix")
    assert result["ratios"]["best_mode"] is None
