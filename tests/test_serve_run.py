"""`serve run configs/config.yaml` as a user runs it: starts, answers /v1/score, shuts down."""

from __future__ import annotations

import subprocess

import requests

from tests.conftest import BIN, REPO, serve_run, wait_for_scores

URL = "http://127.0.0.1:8000"


def test_serve_run_default_config(tmp_path):
    body = {
        "query": "Is it light?",
        "items": ["1 kg", "3 kg", "a feather"],
        "label_token_ids": [9454, 2753],
        "apply_softmax": True,
    }
    env = {"MIS_SERVE_CACHE": str(tmp_path / "cache")}
    try:
        with serve_run(REPO / "configs/config.yaml", tmp_path / "serve.log", env) as log:
            resp = wait_for_scores(URL, body, log)
            scores = resp.json()["scores"]
            assert len(scores) == 3 and all(abs(sum(s) - 1) < 1e-9 for s in scores)
            assert "RANDOM-WEIGHT" in log.read_text()  # the demo model says what it is
            models = requests.get(f"{URL}/v1/models", timeout=30).json()
            assert models["data"][0]["random_weights"] is True
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
