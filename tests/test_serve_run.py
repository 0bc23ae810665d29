"""`serve run configs/config.yaml` as a user runs it: starts, answers /v1/score, shuts down."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import REPO, serve_run, wait_for_scores

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

URL = "http://127.0.0.1:8000"


def test_serve_run_default_config(tmp_path):
    body = {
        "query": "Is it light?",
        "items": ["1 kg", "3 kg", "a feather"],
        "label_token_ids": [9454, 2753],
        "apply_softmax": True,
    }
    # RAY_ADDRESS=local: a Ray of its own, as on a fresh machine, not the test session's
    # cluster; `serve run` stops it on Ctrl-C (serve_run sends SIGINT).
    # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in numbers (the two replicas'
    # warm-up lines) into one.
    env = {
        "MIS_SERVE_CACHE": str(tmp_path / "cache"),
        "RAY_ADDRESS": "local",
        "RAY_DEDUP_LOGS": "0",
    }
    with serve_run(REPO / "configs/config.yaml", tmp_path / "serve.log", env) as log:
        resp = wait_for_scores(URL, body, log)
        scores = resp.json()["scores"]
        assert len(scores) == 3 and all(abs(sum(s) - 1) < 1e-9 for s in scores)
        text = log.read_text()
        assert "RANDOM-WEIGHT" in text  # the demo model says what it is
        assert "warm-up: 11 shapes ready" in text  # every shape, before ready
        # The two replicas (Serve's ranks 0 and 1) compiled in staggered orders; the app
        # answers once one of them is ready.
        shares = ("share 1 of 2 first", "share 2 of 2 first")
        deadline = time.time() + 120
        while not all(s in text for s in shares) and time.time() < deadline:
            time.sleep(1)
            text = log.read_text()
        assert all(s in text for s in shares), text[-3000:]
        models = requests.get(f"{URL}/v1/models", timeout=30).json()
        assert models["data"][0]["random_weights"] is True
