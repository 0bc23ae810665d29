"""A real multi-node Ray cluster on loopback: `ray start --head` plus two worker nodes that
stand for the two hosts of one TPU v6e-8 slice: {"TPU": 4} each, "TPU-v6e-8-head" on worker 0,
and the node labels and TPU_NAME a TPU VM gives Ray (slice name, worker id, pod type), each
with 4 simulated CPU devices. The shipped TPU configs are deployed there with `serve run`,
changed only where a loopback cluster must differ (ports, CPU counts, a tiny float32 model,
a 2-host slice).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from models.engine import score_ids
from tests.conftest import (
    BIN,
    LABELS,
    REPO,
    cluster_ports,
    descendants,
    kill_all,
    random_request,
    serve_run,
    stop_serve_cluster,
    wait_for_scores,
)

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

TPU_HOST = {"TPU": 4}
# The module's cluster's ports (its own window, tests/conftest.py ClusterPorts). One HTTP port for
# every `serve run` on it: Serve keeps the port it started with while it runs, and a later
# `serve run` joins that Serve instance.
PORTS = cluster_ports()
HTTP_PORT = PORTS.http
DASHBOARD_PORT = PORTS.dashboard


@contextlib.contextmanager
def serve_run_on(cluster: str, config, log):
    """`serve run` on the cluster; afterwards its Serve apps are deleted (through the
    dashboard), so the next test deploys onto a clean Serve and cannot get old answers."""
    try:
        with serve_run(config, log, {"RAY_ADDRESS": cluster}) as out:
            yield out
    finally:
        subprocess.run(
            [str(BIN / "serve"), "shutdown", "-y", "-a", f"http://127.0.0.1:{DASHBOARD_PORT}"],
            capture_output=True,
            timeout=120,
            env=os.environ,
        )


HEAD_RESOURCE = "TPU-v6e-8-head"
SLICE = "slice-a"


def _tpu_labels(worker_id: int) -> str:
    labels = {"ray.io/tpu-slice-name": SLICE, "ray.io/tpu-worker-id": str(worker_id)}
    return ",".join(f"{k}={v}" for k, v in (labels | {"ray.io/tpu-pod-type": "v6e-8"}).items())


@pytest.fixture(scope="module")
def cluster():
    """Address of the 3-node cluster. Each node is a `ray start --block` in its own process
    group, stopped by signalling that group: no `ray stop`, which would stop every Ray on
    this machine (a user's own cluster too). The session's in-process cluster is stopped
    first: one that was running while these nodes were killed lost its GCS as soon as it
    started new workers afterwards (seen on Ray 2.60; a cluster started later is fine)."""
    stop_serve_cluster()
    env = (
        os.environ
        | PORTS.env()
        | {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        }
    )
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20)]
    common += ["--disable-usage-stats"]
    address = f"127.0.0.1:{PORTS.gcs}"

    nodes: list[subprocess.Popen] = []

    def ray_cli(*args: str, tpu: dict[str, str] | None = None) -> None:
        """Start one node and wait until it has joined (one at a time: two workers started
        together, once the head was up, did not join in 2 minutes)."""
        # Each node's dashboard agent on a port of the window: by default every agent on this
        # machine takes 52365, and only the first to start got it; with none of this cluster's
        # agents listening, `ray job submit` was refused ("No available agent").
        agent = ["--dashboard-agent-listen-port", str(PORTS.port(4 + len(nodes)))]
        cmd = [str(BIN / "ray"), *args, *agent, "--block"]
        nodes.append(
            subprocess.Popen(
                cmd,
                env=env | (tpu or {}),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_for_nodes(address, len(nodes))

    try:
        ray_cli(
            "start",
            "--head",
            "--port",
            address.split(":")[1],
            *common,
            "--include-dashboard",
            "true",
            "--dashboard-port",
            str(DASHBOARD_PORT),
        )
        for worker, resources in enumerate((TPU_HOST | {HEAD_RESOURCE: 1}, TPU_HOST)):
            ray_cli(
                "start",
                "--address",
                address,
                "--resources",
                json.dumps(resources),
                "--labels",
                _tpu_labels(worker),
                *common,
                tpu={"TPU_NAME": SLICE},  # what Ray reads the slice name from on GKE
            )
        yield address
    finally:
        _stop_groups(nodes)
        # `ray start` left this cluster's address as "the current cluster" (`ray stop` would
        # have removed it): a later `ray.init()` must not try to join the stopped cluster.
        current = Path("/tmp/ray/ray_current_cluster")
        port = address.rsplit(":", 1)[1]  # the file names the head by its node IP
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _wait_for_nodes(address: str, n: int, timeout_s: float = 120) -> None:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout_s
    while True:
        try:
            alive = [x for x in list_nodes(address=address) if x.state == "ALIVE"]
            if len(alive) >= n:
                return
        except Exception:  # the head is still starting
            alive = []
        if time.time() > deadline:
            raise AssertionError(f"{len(alive)} of {n} Ray nodes came up")
        time.sleep(1)


def _stop_groups(procs: list[subprocess.Popen], timeout_s: float = 10) -> None:
    """SIGTERM to every `ray start --block` node's process group at once (a node stops its
    raylet and workers), one shared wait, then SIGKILL to whatever still runs."""
    tree = [p for proc in procs for p in descendants(proc.pid)]  # before they are orphans
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    kill_all(tree)  # what Ray started in groups of its own (Serve's HAProxy)


def _loopback_config(tmp_path, name: str, ckpt: str, port: int, args: dict, scorer: dict):
    """configs/NAME with a tiny float32 model and CPU counts that fit 1-CPU loopback nodes;
    one HTTP proxy, since the three "hosts" share one machine's ports."""
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = raw["applications"]
    app["args"]["model"] = {"path": ckpt}
    app["args"]["engine"].update(
        dtype="float32", max_batch_tokens=512, max_item_tokens=32, max_query_tokens=128
    )
    app["args"]["fanout"] = {"chunk_items": 8}
    # compile on first use: replicas come up sooner (a slice must warm up: config.py says why)
    app["args"]["warmup"] = args.get("placement.hosts_per_replica", 1) > 1
    for key, value in args.items():
        group, leaf = key.split(".")
        app["args"].setdefault(group, {})[leaf] = value
    deps = {d["name"]: d for d in app["deployments"]}
    deps["ScoreIngress"].update(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    deps["Scorer"]["ray_actor_options"]["num_cpus"] = 0.1
    deps["Scorer"].update(scorer)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _actors(address: str, class_name: str | None) -> list:
    """The cluster's actors of a class (None: every actor, dead ones too)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)] if class_name else None
    return list_actors(address=address, filters=filters, detail=True, limit=10_000)


def _placed_actors(address: str, class_name: str, count: int, timeout_s: float = 60) -> list:
    """The `count` live actors of a class, each with its node, once the state API lists them so
    (asked again until then): in full test runs it has listed replicas that were serving
    requests without their node ids, or not at all."""
    deadline = time.time() + timeout_s
    while True:
        actors = _actors(address, class_name)
        alive = [a for a in actors if a.state == "ALIVE" and a.node_id]
        if len(alive) == count or time.time() > deadline:
            assert len(alive) == count, [(a.name, a.state, a.node_id) for a in actors]
            return alive
        time.sleep(1)


def _tpu_nodes(address: str) -> set[str]:
    from ray.util.state import list_nodes

    return {
        n.node_id for n in list_nodes(address=address, detail=True) if "TPU" in n.resources_total
    }


def _request() -> dict:
    query, items = random_request(seed=80, n_items=200, q_len=30, max_item=20)
    return {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": True}


def _check_scores(resp, engine, record, what: str) -> None:
    body = _request()
    got = np.array(resp.json()["scores"])
    want = score_ids(engine("qwen3"), body["query"], body["items"], LABELS, apply_softmax=True)
    record(f"multi-node {what} vs offline engine, softmax", np.abs(got - want).max())
    assert np.abs(got - want).max() <= 1e-5


def test_tpu_config_replicas_on_tpu_hosts(cluster, ckpts, engine, record, tmp_path):
    """configs/tpu-v6e.yaml: one replica per TPU host (tp_size 4 over its 4 devices); a
    request's chunks are scored on both hosts."""
    port = HTTP_PORT
    config = _loopback_config(
        tmp_path,
        "tpu-v6e.yaml",
        ckpts["qwen3"],
        port,
        {},
        {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}},
    )
    url = f"http://127.0.0.1:{port}"
    with serve_run_on(cluster, config, tmp_path / "serve.log") as log:
        resp = wait_for_scores(url, _request(), log)
        # The first answer may come while the second replica still warms up: ask until both
        # are in service (Serve routes only to running replicas).
        deadline = time.time() + 120
        while len(resp.headers["X-MIS-Replicas"].split(",")) < 2 and time.time() < deadline:
            time.sleep(2)
            resp = requests.post(f"{url}/v1/score", json=_request(), timeout=120)
        _check_scores(resp, engine, record, "tpu-v6e.yaml")
        replicas = _placed_actors(cluster, "ServeReplica:mis:Scorer", 2)
        tpu_nodes = _tpu_nodes(cluster)
        nodes = {a.name.rsplit("#", 1)[-1]: a.node_id for a in replicas}
        assert set(nodes.values()) == tpu_nodes  # one replica on each TPU host, none elsewhere
        served = set(resp.headers["X-MIS-Replicas"].split(","))
        assert {nodes[r] for r in served} == tpu_nodes  # one request, both hosts
        resp = requests.post(f"{url}/v1/score", json={"query": [1]}, timeout=30)
        assert resp.status_code == 400


@pytest.mark.parametrize(
    # Both `slow` (~3 min on 2 cores: a slice warms up every shape over two hosts); the
    # engine's two-host program is in the default run (tests/test_multihost.py), the slice
    # manifest's placement in tests/test_deploy.py.
    "placement",
    [pytest.param(p, marks=pytest.mark.slow) for p in ("tpu_topology", "bundles")],
)
def test_slice_config_one_replica_over_two_hosts(
    cluster, ckpts, engine, record, tmp_path, placement
):
    """configs/tpu-v6e-16-slice.yaml shrunk to a 2-host slice: one replica whose two host
    actors (2 devices each, one jax.distributed program, tp_size 4) sit on the two TPU hosts.
    The replica reserves the slice itself (`tpu_topology`, Ray's slice placement group), or
    Serve reserves the deployment's `placement_group_bundles` for it (marker `slow`: the
    same engine code, another placement)."""
    port = HTTP_PORT
    args = {"placement.hosts_per_replica": 2, "engine.tp_size": 4, "placement.host_num_cpus": 0.1}
    scorer = {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {
            "num_cpus": 0.1,
            "runtime_env": {"env_vars": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}},
        },
    }
    if placement == "tpu_topology":
        args["placement.tpu_topology"] = "2x4"  # v6e-8 as 2 hosts of 4 chips
    else:
        args["placement.tpu_topology"] = None
        bundle = {"CPU": 0.2, **TPU_HOST}
        scorer["placement_group_bundles"] = [bundle | {"CPU": 0.3, HEAD_RESOURCE: 1}, bundle]
        scorer["placement_group_strategy"] = "STRICT_SPREAD"
    config = _loopback_config(tmp_path, "tpu-v6e-16-slice.yaml", ckpts["qwen3"], port, args, scorer)
    url = f"http://127.0.0.1:{port}"
    with serve_run_on(cluster, config, tmp_path / "serve.log") as log:
        resp = wait_for_scores(url, _request(), log)
        _check_scores(resp, engine, record, f"2-host slice ({placement})")
        hosts = _placed_actors(cluster, "SliceHost", 2)
        assert {a.node_id for a in hosts} == _tpu_nodes(cluster)  # one per TPU host


def test_batch_job_submitted_runs_over_the_nodes(cluster, ckpts, engine, tmp_path):
    """README's cluster recipe: `ray job submit` of `mis-score batch` to the cluster, two
    engines (1 CPU each on 1-CPU nodes: two nodes), pair rows (one layout per input): every
    row's output bit-identical to `mis-score score`."""
    from mis_score.offline import OfflineScorer
    from tests.test_batch import check_row, pair_rows, reference

    rows = pair_rows(seed=91, queries=4, per_query=4)
    # A directory of four files, as a job over a data set's parts is submitted (the README's
    # recipe); which engine scores which file's block is Ray Data's choice (checked below).
    (tmp_path / "in").mkdir()
    for part in range(4):
        text = "".join(json.dumps(r) + "\n" for r in rows[part * 4 : (part + 1) * 4])
        (tmp_path / "in" / f"{part}.jsonl").write_text(text)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    engine_flags = ["--max-batch-tokens", "1024", "--max-item-tokens", "64"]
    engine_flags += ["--max-query-tokens", "512", "--mode", "prefix"]
    submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"]
    submit += ["--", sys.executable, "-m", "mis_score", "batch", "--model-path", ckpts["qwen3"]]
    submit += ["--input", str(tmp_path / "in"), "--output", str(out), *engine_flags]
    submit += ["--label-token-ids", ",".join(map(str, LABELS)), "--num-engines", "2"]
    submit += ["--batch-rows", "2", "--summary", str(summary)]
    job = subprocess.run(submit, capture_output=True, text=True, timeout=300, env=os.environ)
    assert job.returncode == 0 and out.exists(), job.stdout[-4000:] + job.stderr[-4000:]
    scorer = OfflineScorer(engine("qwen3", "prefix"), "qwen3", max_items=2048)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(rows)
    for g, row in zip(got, rows, strict=True):
        check_row(g, row, reference(scorer, row, {"label_token_ids": LABELS}), pair=True)
    # Two engines, one on each node (SPREAD). Which of them scores which block is Ray Data's
    # choice: a job this small may be done by the engine that finished its warm-up first.
    actors = [a for a in _actors(cluster, None) if "_EngineActor" in a.class_name]
    assert len(actors) == 2 and len({a.node_id for a in actors}) == 2, actors
    engines = json.loads(summary.read_text())["engines"]
    assert engines and {e["node"] for e in engines} <= {a.node_id for a in actors}
