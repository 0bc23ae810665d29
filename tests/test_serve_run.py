"""`serve run configs/config.yaml` as a user runs it: starts, answers /v1/score, shuts down; and
next to another deployment on the same machine, neither answers the other's requests."""

from __future__ import annotations

import concurrent.futures
import re
import time

import numpy as np
import pytest
import requests

from tests.conftest import LABELS, REPO, deployment_of, running_serve, serve_run, wait_for_scores

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

URL = "http://127.0.0.1:8000"
BESIDE = "beside"  # the app on the session's cluster, next to `serve run`'s cluster


def test_serve_run_default_config(tmp_path, ckpts):
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
        assert "warm-up: 15 shapes ready" in text  # every shape, before ready
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
        while (health := requests.get(f"{URL}/health", timeout=30)).json()[
            "scorer_replicas_ready"
        ] < 2 and time.time() < deadline:  # the second replica may still be warming up
            assert health.status_code == 200
            time.sleep(0.5)
        assert health.status_code == 200 and health.json()["scorer_replicas_ready"] == 2
        _two_deployments_on_one_machine(URL, health.json()["deployment"], log, ckpts["qwen3"])


def _two_deployments_on_one_machine(url: str, identity: str, log, ckpt: str) -> None:
    """`serve run`'s cluster and an app on the session's cluster, on one machine, both under
    load at once: every answer comes from the deployment it was sent to (X-MIS-Deployment),
    each side scored exactly the items sent to it, and a request that names the other
    deployment is refused (421) by both."""
    from ray import serve

    from serve_app.app import build_graph

    # Small forwards, compiled on first use: the requests below need two shapes.
    engine = {"max_batch_tokens": 256, "max_item_tokens": 16, "max_query_tokens": 16}
    app = build_graph(
        {"model": {"path": ckpt}, "engine": engine, "warmup": False},
        scorer_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        ingress_options={"ray_actor_options": {"num_cpus": 0.1}},
    )
    with running_serve((BESIDE, "/beside", app)) as session_url:
        beside = f"{session_url}/beside"
        mine = deployment_of(BESIDE)
        assert mine != identity
        scorer = serve.get_deployment_handle("Scorer", app_name=BESIDE)
        before = scorer.stats.remote().result()["items"]
        logged = _items_logged(log.read_text())
        rng = np.random.default_rng(0)
        sizes = rng.integers(1, 40, 40).tolist()
        bodies = [
            {"query": [5, 6, 7], "items": [[8, 9]] * n, "label_token_ids": LABELS} for n in sizes
        ]
        targets = [(beside, mine), (url, identity)] * 20

        def post(i: int) -> requests.Response:
            return requests.post(f"{targets[i][0]}/v1/score", json=bodies[i], timeout=120)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(len(bodies))))
        for r, (_, want) in zip(answers, targets, strict=True):
            assert r.status_code == 200, r.text
            assert r.headers["X-MIS-Deployment"] == want
        sent_beside = sum(sizes[0::2])
        sent_run = sum(sizes[1::2])
        assert scorer.stats.remote().result()["items"] - before == sent_beside
        deadline = time.time() + 30
        while _items_logged(log.read_text()) - logged < sent_run and time.time() < deadline:
            time.sleep(0.5)
        assert _items_logged(log.read_text()) - logged == sent_run
        for target, other in ((beside, identity), (url, mine)):
            r = requests.post(
                f"{target}/v1/score",
                json=bodies[0],
                headers={"X-MIS-Deployment": other},
                timeout=60,
            )
            assert r.status_code == 421 and r.json()["message"].startswith("x-mis-deployment:")


def _items_logged(text: str) -> int:
    """Items the `serve run` cluster's ingress says it scored (its "score: N items" lines, once
    per request id: a line may reach the log more than once)."""
    lines = re.findall(r"ScoreIngress \w+ ([\w-]+) -- score: (\d+) items in", text)
    return sum(int(n) for n in dict(lines).values())
