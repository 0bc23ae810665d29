"""Long runs (marker `slow`, not in the default CI): soak, a burst at 4x capacity, and a
replica killed during a Locust run. `bash scripts/test.sh -m slow -k soak` runs them; each
prints its figures (requests, status codes, p99 per minute, RSS)."""

from __future__ import annotations

import time

import pytest

from loadtests import soak
from tests.conftest import TEST_ENGINE, running_serve

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MAX_INFLIGHT = 4  # the service's capacity: requests in flight per ingress replica
WORKLOAD = {"MIS_QUERY_TOKENS": "200", "MIS_ITEMS": "100", "MIS_ITEM_TOKENS": "20"}


@pytest.fixture(scope="module")
def service(ckpts):
    from serve_app.app import build_graph

    args = {
        "model": {"path": ckpts["qwen3"]},
        "engine": TEST_ENGINE,  # warm-up compiles every shape: none compiles under load
        "fanout": {"chunk_items": 32},
        "limits": {"max_inflight_requests": MAX_INFLIGHT},
    }
    scorers = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}
    app = build_graph(args, scorer_options=scorers)
    with pytest.MonkeyPatch.context() as env, running_serve(("mis", "/", app)) as url:
        for name, value in WORKLOAD.items():  # Locust's workload (loadtests/soak.py passes env)
            env.setenv(name, value)
        yield url


def _run(url, tmp_path, users, seconds, *extra):
    return soak.main(
        ["--url", url, "--users", str(users), "--seconds", str(seconds), "--out", str(tmp_path)]
        + list(extra)
    )


def test_soak_5_minutes_steady(service, tmp_path):
    result = _run(service, tmp_path, 2, 300)
    assert result["requests"] > 100 and result["failures"] == 0
    assert abs(result["p99_drift"]) < 0.2, result


def test_burst_at_4x_capacity_sheds_load_with_bounded_memory(service, tmp_path):
    result = _run(service, tmp_path, 4 * MAX_INFLIGHT, 60)
    assert set(result["status_counts"]) <= {"200", "503"}, result
    assert result["status_counts"].get("200", 0) > 0
    assert result["rss_mb_max"] < 1.5 * result["rss_mb_first"], result


def test_locust_with_a_replica_killed(service, tmp_path):
    result = _run(service, tmp_path, 2, 60, "--kill-replica-after", "15")
    assert result["killed_replica"]
    assert set(result["status_counts"]) <= {"200", "503"}, result
    deadline = time.time() + 180  # and Serve replaces the killed replica
    while soak.scorer_replicas("mis") != (2, 2) and time.time() < deadline:
        time.sleep(1)
    assert soak.scorer_replicas("mis") == (2, 2)
