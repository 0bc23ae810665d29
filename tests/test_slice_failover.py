"""Two multi-host slice replicas (2 host processes each, one jax.distributed program per
replica) behind the Serve app; one host process is killed. No request may fail or come back
wrong: chunks of the broken replica are retried on the other, which Serve keeps serving while
it replaces the broken slice as one unit (replica, placement group and host actors). And a slice
replica serves LoRA adapters, one from its settings and one added at run time (the ingress's
user_config), as one process scores them.
Marker `slow` (~2 min each): `bash scripts/test.sh -m slow tests/test_slice_failover.py`."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import requests

from models.engine import ScoringEngine, score_ids
from models.engine_config import EngineConfig
from models.inputs import Chunk
from tests.conftest import LABELS, TEST_ENGINE, random_request, running_serve

pytestmark = [pytest.mark.slow, pytest.mark.ray]
HOST_ENV = {"env_vars": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}}


def _body(seed: int) -> dict:
    query, items = random_request(seed=seed, n_items=64, q_len=30, max_item=20)
    return {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": True}


def test_killed_slice_host_loses_no_request(ckpts, engine, record):
    import ray

    from serve_app.app import build_graph

    args = {
        "model": {"path": ckpts["qwen3"]},
        "engine": TEST_ENGINE | {"tp_size": 4},  # 2 hosts x 2 devices
        "fanout": {"chunk_items": 8},
        "placement": {"hosts_per_replica": 2, "host_num_cpus": 0.2},
    }
    scorers = {
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 0.05, "runtime_env": HOST_ENV},
        "placement_group_bundles": [{"CPU": 0.25}, {"CPU": 0.2}],
    }
    offline = engine("qwen3")
    with running_serve(("mis", "/", build_graph(args, scorer_options=scorers))) as url:

        def check(seed: int) -> set[str]:
            body = _body(seed)
            resp = requests.post(f"{url}/v1/score", json=body, timeout=300)
            assert resp.status_code == 200, resp.text
            want = score_ids(offline, body["query"], body["items"], LABELS, apply_softmax=True)
            diff = np.abs(np.array(resp.json()["scores"]) - want).max()
            record("slice replicas through HTTP vs offline engine, softmax", diff)
            assert diff <= 1e-5
            return set(resp.headers["X-MIS-Replicas"].split(","))

        check(0)
        hosts = sorted(
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SliceHost:")
        )
        assert len(hosts) == 4  # 2 replicas x 2 hosts
        old = {name.split(":")[1] for name, _ in hosts}  # "SliceHost:<replica>:<rank>"
        assert len(old) == 2
        victim, namespace = hosts[-1]
        ray.kill(ray.get_actor(victim, namespace=namespace))
        start = time.time()
        seen, deadline = set(), start + 180
        seed = 1
        while time.time() < deadline:  # every request right while the slice is replaced
            seen |= check(seed)
            seed += 1
            if seen - old:  # a new replica serves
                break
        assert seen - old, f"no replacement replica served: {seen}"
        assert seed > 2
        print(
            f"host killed: {seed - 1} requests, all right; a new slice served after "
            f"{time.time() - start:.0f} s"
        )


def test_slice_replica_serves_adapters(ckpts, tmp_path, record):
    """model.adapters' "a" from the start and the user_config's "b" added at run time, on one
    replica over two hosts: each adapter's scores as one process scores them, "b" after the
    503s (Retry-After) of its first requests while both hosts read it."""
    from serve_app.app import build_graph
    from tests.hf_families import write_adapter

    adapters = {
        n: write_adapter(ckpts["qwen3"], tmp_path / n, seed=s) for n, s in (("a", 7), ("b", 8))
    }
    engine = TEST_ENGINE | {"max_adapters": 2}
    args = {
        "model": {"path": ckpts["qwen3"], "adapters": {"a": adapters["a"]}},
        "engine": engine | {"tp_size": 4},
        "placement": {"hosts_per_replica": 2, "host_num_cpus": 0.2},
    }
    scorers = {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.05, "runtime_env": HOST_ENV},
        "placement_group_bundles": [{"CPU": 0.25}, {"CPU": 0.2}],
    }
    ingress = {"user_config": {"adapters": {"b": adapters["b"]}}}
    offline = ScoringEngine(ckpts["qwen3"], EngineConfig(**engine), adapters)
    app = build_graph(args, scorer_options=scorers, ingress_options=ingress)
    with running_serve(("mis", "/", app)) as url:
        for seed, name in enumerate(("a", "b", None)):
            body = _body(seed) | ({"model": name} if name else {})
            deadline, loading = time.time() + 120, 0
            while (
                r := requests.post(f"{url}/v1/score", json=body, timeout=300)
            ).status_code == 503:
                assert name == "b" and r.headers["Retry-After"] and time.time() < deadline, r.text
                loading += 1
                time.sleep(1)
            assert r.status_code == 200, r.text
            # The run-time adapter's first request starts its read on the hosts: a 503.
            assert (loading > 0) == (name == "b"), loading
            chunk = Chunk(tuple(body["query"]), tuple(map(tuple, body["items"])), tuple(LABELS))
            (want,) = offline.score([dataclasses.replace(chunk, apply_softmax=True, adapter=name)])
            diff = np.abs(np.array(r.json()["scores"]) - want).max()
            record(f"slice replica through HTTP vs one process, adapter {name}, softmax", diff)
            assert diff <= 1e-5
