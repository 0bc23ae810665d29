"""`serve run configs/config.yaml` as a user runs it: starts, answers /v1/score, shuts down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"


def test_serve_run_default_config(tmp_path):
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "MIS_SERVE_CACHE": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
    }
    serve_cli = Path(sys.executable).with_name("serve")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(serve_cli), "run", "configs/config.yaml"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    body = {
        "query": "Is it light?",
        "items": ["1 kg", "3 kg", "a feather"],
        "label_token_ids": [9454, 2753],
        "apply_softmax": True,
    }
    try:
        deadline, resp = time.time() + 420, None
        while time.time() < deadline and proc.poll() is None:
            try:
                resp = requests.post(f"{URL}/v1/score", json=body, timeout=30)
                if resp.status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # still deploying
                pass
            if "Deploying app 'mis' failed" in (tmp_path / "serve.log").read_text():
                break
            time.sleep(2)
        out = (tmp_path / "serve.log").read_text()
        assert resp is not None and resp.status_code == 200, out[-3000:]
        scores = resp.json()["scores"]
        assert len(scores) == 3 and all(abs(sum(s) - 1) < 1e-9 for s in scores)
        assert "RANDOM-WEIGHT" in out  # the demo model says what it is
        models = requests.get(f"{URL}/v1/models", timeout=30).json()
        assert models["data"][0]["random_weights"] is True
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            [str(serve_cli.with_name("ray")), "stop", "--force"],
            env=env,
            capture_output=True,
            timeout=120,
        )
