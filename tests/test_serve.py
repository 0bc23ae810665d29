"""The Ray Serve application in-process (real Ray, no mocks) on the tiny checkpoint."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from loadtests.summary import summarize
from tests.conftest import LABELS, running_serve

CHUNK = 8


@pytest.fixture(scope="module")
def service(ckpts):
    """Base URL of a running app: 2 scorer replicas, prefix mode, chunks of 8 items, up to 4
    chunks per forward."""
    from serve_app.app import build_graph

    args = {
        "model_path": ckpts["qwen3"],
        "model_name": "tiny",
        "chunk_size": CHUNK,
        "max_chunk_tokens": 200,
        "max_batch_rows": 4,  # chunks of concurrent requests share forwards
        "warmup_query_tokens": [1, 64],
        "warmup_item_tokens": [1, 24],
    }
    scorers = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}
    with running_serve(("mis", "/", build_graph(args, scorer_options=scorers))) as url:
        yield url


def _post(url, body):
    return requests.post(f"{url}/v1/score", json=body, timeout=300)


def _words(rng, n):
    vocab = ["fast", "light", "laptop", "battery", "screen", "cheap", "heavy", "gaming", "red"]
    return " ".join(rng.choice(vocab, n))


@pytest.mark.parametrize("n_items", [1, 7, 500, 1000])
@pytest.mark.parametrize("kind", ["ids", "text"])
def test_http_equals_offline_engine(service, engine, record, n_items, kind):
    rng = np.random.default_rng(n_items)
    if kind == "ids":
        query = rng.integers(0, 151_000, 30).tolist()
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, 25))).tolist() for _ in range(n_items)
        ]
    else:
        query = _words(rng, 12)
        items = [_words(rng, int(rng.integers(1, 12))) for _ in range(n_items)]
    body = {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": True}
    resp = _post(service, body)
    assert resp.status_code == 200, resp.text
    got = np.array(resp.json()["scores"])
    eng = engine("qwen3", "prefix")
    if kind == "text":
        query, items = eng.tokenizer.encode(query), eng.tokenizer.encode_batch(items)
    ref = eng.score_ids(query, items, LABELS, apply_softmax=True)
    assert got.shape == (n_items, len(LABELS))
    record("HTTP vs offline engine, softmax", np.abs(got - ref).max())
    assert np.abs(got - ref).max() <= 1e-6
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == len(query) + sum(map(len, items))
    assert int(resp.headers["X-MIS-Chunks"]) >= -(-n_items // CHUNK)
    if n_items >= 500:  # the fan-out really spreads over both replicas
        assert len(resp.headers["X-MIS-Replicas"].split(",")) == 2


def test_concurrent_requests_get_their_own_scores(service, engine):
    rng = np.random.default_rng(7)
    bodies = []
    for _ in range(16):
        query = rng.integers(0, 151_000, int(rng.integers(5, 60))).tolist()
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, 20))).tolist()
            for _ in range(int(rng.integers(1, 40)))
        ]
        bodies.append({"query": query, "items": items, "label_token_ids": LABELS})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: _post(service, b), bodies))
    eng = engine("qwen3", "prefix")
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        ref = eng.score_ids(body["query"], body["items"], LABELS)
        got = np.array(resp.json()["scores"])
        assert np.abs(np.log(got) - np.log(ref)).max() <= 1e-5


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"query": [1], "items": [[1, 10**7]], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": "q", "items": [[1]], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": "q", "items": ["a"]}, 400, "label_token_ids"),
        ({"query": [1], "items": [[1]] * 3000, "label_token_ids": [1]}, 400, "items"),
        ({"query": [1], "items": [[1] * 600], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": [1], "items": [[1]], "label_token_ids": [1], "model": "x"}, 404, "model"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(service, body, code, field):
    resp = _post(service, body)
    assert resp.status_code == code, resp.text
    err = resp.json()
    assert err["object"] == "error" and err["code"] == code and field in err["message"]
    # ...and the service still answers a good request right after.
    assert _post(service, {"query": [1], "items": [[2]], "label_token_ids": [1]}).ok


def test_malformed_json_is_400(service):
    resp = requests.post(
        f"{service}/v1/score",
        data="{oops",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400 and "JSON" in resp.json()["message"]


def test_health_models_and_openapi(service):
    assert requests.get(f"{service}/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(f"{service}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["random_weights"] is True
    spec = requests.get(f"{service}/openapi.json", timeout=30).json()
    assert "/v1/score" in spec["paths"]
    assert requests.get(f"{service}/docs", timeout=30).status_code == 200


def test_locust_headless_against_the_service(service, tmp_path):
    """The load test as shipped: a short headless run with a small workload, 0 failures."""
    repo = Path(__file__).resolve().parents[1]
    locust = Path(sys.executable).with_name("locust")
    env = os.environ | {"MIS_QUERY_TOKENS": "40", "MIS_ITEMS": "24", "MIS_ITEM_TOKENS": "6"}
    subprocess.run(
        [
            str(locust),
            "-f",
            "loadtests/locustfile.py",
            "--headless",
            "--host",
            service,
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "8s",
            "--csv",
            str(tmp_path / "l"),
            "--only-summary",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    s = summarize(str(tmp_path / "l_stats.csv"), items_per_request=24, duration_s=8)
    assert s["requests"] > 0 and s["failures"] == 0
