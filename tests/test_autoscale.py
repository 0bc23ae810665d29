"""Autoscaling under Locust load (marker `slow`): the Scorer deployment of configs/config.yaml,
autoscaled 1..2 with short delays, scales up from min_replicas while Locust runs and back down
after, with no failed request. `bash scripts/test.sh -m slow -k autoscale` runs it and prints
the replica count timeline."""

from __future__ import annotations

import pytest
import yaml

from loadtests import soak
from tests.conftest import REPO, running_serve

pytestmark = [pytest.mark.slow, pytest.mark.ray]
# Within the config's engine limits; warm-up compiles every shape, so a new replica compiles
# nothing after it is up.
WORKLOAD = {"MIS_QUERY_TOKENS": "50", "MIS_ITEMS": "200", "MIS_ITEM_TOKENS": "20"}


def test_scorer_scales_up_under_load_and_back_down(ckpts, tmp_path, monkeypatch):
    from serve_app.app import build_graph

    raw = yaml.safe_load((REPO / "configs/config.yaml").read_text())
    (app,) = raw["applications"]
    (scorer,) = [d for d in app["deployments"] if d["name"] == "Scorer"]
    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4}
    auto |= {"upscale_delay_s": 2, "downscale_delay_s": 10}
    options = {k: v for k, v in scorer.items() if k not in ("name", "num_replicas")}
    options["autoscaling_config"] = auto
    args = app["args"] | {"model": app["args"].get("model", {}) | {"path": ckpts["qwen3"]}}
    for name, value in WORKLOAD.items():  # Locust's workload (loadtests/soak.py passes env)
        monkeypatch.setenv(name, value)
    with running_serve(("mis", "/", build_graph(args, scorer_options=options))) as url:
        result = soak.main(
            ["--url", url, "--users", "4", "--seconds", "90", "--cooldown-s", "90"]
            + ["--out", str(tmp_path)]
        )
    print("replica timeline (s, running, all):", result["replica_timeline"])
    load_end = result["load_stopped_at_s"]
    running = [(t, n) for t, n, _ in result["replica_timeline"]]
    assert running[0][1] == auto["min_replicas"]
    # scaled up while the load ran, and the new replica served part of it
    assert any(n == auto["max_replicas"] and t < load_end - 10 for t, n in running), running
    assert running[-1][1] == auto["min_replicas"]  # and back down after
    assert result["failures"] == 0 and result["requests"] > 10, result
