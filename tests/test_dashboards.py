"""The Grafana board and the alert rules (deploy/dashboards.py): generated, importable, every
query valid PromQL (promtool), every metric it names exported by a live service (a scrape of
Ray's metrics port), the alerts checked and unit-tested by promtool; and, opt-in
(`-m prometheus`), a real Prometheus scraping the service under load answers every query."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from deploy import dashboards
from tests.conftest import TEST_ENGINE, deployment_of, running_serve, serve_cluster

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / ".cache" / "prometheus" / "usr" / "bin"  # scripts/prometheus-tools.sh
APP = "dashboard-tests"


def _tool(name: str) -> str:
    """promtool / prometheus: on PATH or where scripts/prometheus-tools.sh unpacks them. CI
    (.ci/run) fetches them, so there a missing one is a failure, not a skip."""
    found = shutil.which(name) or (
        str(PROMETHEUS_DIR / name) if (PROMETHEUS_DIR / name).is_file() else None
    )
    if found is None:
        why = f"no {name}: bash scripts/prometheus-tools.sh (Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(why + "; .ci/run should have fetched it")
        pytest.skip(why)
    return found


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL as Prometheus receives it) for every board query and alert quantity."""
    out = [
        (f"panel {p.title!r} {chr(ord('A') + j)}", dashboards.concrete(q.expr))
        for p in dashboards.PANELS
        for j, q in enumerate(p.queries)
    ]
    return out + [(f"alert {a.name}", a.quantity) for a in dashboards.ALERT_RULES]


def test_board_and_rules_are_generated(tmp_path):
    assert dashboards.main(["--check"]) == 0


def test_board_is_importable():
    """What Grafana's import needs: a uid and title, panels with unique ids, each query with a
    refId on the board's data-source variable (no edits after import)."""
    board = json.loads(dashboards.DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
    titles = {p["title"] for p in board["panels"]}
    want = {"Requests by route", "Items by route", "Latency by route", "Chunk queue depth"}
    want |= {"Batch fill", "Prefix-cache hit ratio", "Compilations after ready"}
    assert want | {"Ready replicas", "Errors by status code"} <= titles


def test_metric_names_of_an_expression():
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{x=~"$v", y="b c"}[1m])))'
        " / on (route) group_left (z) (b_total offset 5m or vector(0)) and c:rec"
    )
    assert dashboards.metric_names(expr) == {"a_bucket", "b_total", "c:rec"}


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each board query and alert quantity (as recording rules); a broken
    expression fails the same check."""
    promtool = _tool("promtool")
    rules = [
        {"record": f"mis_serve:query:{i}", "expr": expr} for i, (_, expr) in enumerate(_queries())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rules[0]["expr"] = "sum by (route (rate(x[1m]))"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode != 0


def test_alert_rules_pass_promtool_check_and_unit_tests():
    promtool = _tool("promtool")
    rules = REPO / "deploy" / "prometheus" / "alerts.yaml"
    tests = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
    for cmd in (["check", "rules", str(rules)], ["test", "rules", str(tests)]):
        out = subprocess.run([promtool, *cmd], capture_output=True, text=True, cwd=tests.parent)
        assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for r in yaml.safe_load(rules.read_text())["groups"][0]["rules"]}
    tested = {
        case["alertname"]
        for t in yaml.safe_load(tests.read_text())["tests"]
        for case in t["alert_rule_test"]
        if case["exp_alerts"]  # each alert seen firing, not only quiet
    }
    assert tested == alerts


# --- against a live service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def service(ckpts):
    """The smallest app that moves every series the board reads: one scorer replica without
    warm-up (so its first shapes compile after it is ready), test-sized forwards."""
    from serve_app.app import build_graph

    args = {"model": {"path": ckpts["qwen3"]}, "engine": TEST_ENGINE, "warmup": False}
    scorers = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    with running_serve((APP, "/", build_graph(args, scorer_options=scorers))) as url:
        yield url


def _send(url: str, i: int = 0) -> None:
    """A score request (its query repeats: prefix-cache hits after the first), a rerank and a
    bad one (a 400)."""
    headers = {"X-MIS-Deployment": deployment_of(APP)}
    body = {"query": [5, 6, 7] * 4, "items": [[7 + i % 3] * 5] * 3, "label_token_ids": [9454, 2753]}
    for path, payload, code in (
        ("/v1/score", body, 200),
        ("/v1/rerank", {"query": "light?", "documents": ["1 kg", "3 kg"]}, 200),
        ("/v1/score", {"query": [1], "items": [], "label_token_ids": "x"}, 400),
    ):
        resp = requests.post(url + path, json=payload, headers=headers, timeout=300)
        assert resp.status_code == code, resp.text
    assert requests.get(url + "/health", headers=headers, timeout=30).status_code == 200


def _scrape() -> dict[str, set[str]]:
    """Ray's metrics port: {metric name: the labels every series of it carries}."""
    _, port = serve_cluster()
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line[:1].isalpha():
            name = line.split("{")[0].split(" ")[0]
            labels = set(re.findall(r'(\w+)="', line.partition("{")[2].rpartition("}")[0]))
            out[name] = out[name] & labels if name in out else labels
    return out


def _grouped_by(expr: str) -> set[str]:
    """Labels the query groups by (the board's legends and the alerts' labels show them)."""
    return {
        label.strip()
        for group in re.findall(r"\bby \(([^)]*)\)", expr)
        for label in group.split(",")
    }


@pytest.mark.ray
def test_queries_name_only_metrics_the_service_exports(service):
    """Every metric a board query or an alert names is in a scrape of Ray's metrics port
    (Serve's and ours), once the requests that make each exist have been exported, and each
    carries the labels the query groups by (`le` on histogram buckets)."""
    used = {n: where for where, expr in _queries() for n in dashboards.metric_names(expr)}
    assert len(used) >= 12
    for i in range(2):
        _send(service, i)
    deadline, missing, scraped = time.time() + 120, set(used), {}
    while missing and time.time() < deadline:
        scraped = _scrape()
        missing = set(used) - set(scraped)
        time.sleep(2)
    assert not missing, {n: used[n] for n in missing}
    unlabeled = {}
    for where, expr in _queries():
        for name in dashboards.metric_names(expr):
            want = _grouped_by(expr) - ({"le"} if not name.endswith("_bucket") else set())
            if want - scraped[name]:
                unlabeled[f"{where}: {name}"] = sorted(want - scraped[name])
    assert not unlabeled, unlabeled


@pytest.mark.ray
@pytest.mark.prometheus
def test_real_prometheus_answers_every_query(service, tmp_path):
    """`bash scripts/test.sh -m prometheus`: Prometheus (Debian's, scripts/prometheus-tools.sh)
    scrapes the live service every second with the alert rules loaded; after a short load
    every board query and every alert quantity returns series, and every rule evaluates
    without an error."""
    prometheus = _tool("prometheus")
    _, metrics_port = serve_cluster()
    port = metrics_port + 20  # inside this test cluster's port window (tests/conftest.py)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        # A short load: 4 clients for 20 s (bounded), scraped throughout.
        stop = time.time() + 20
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_load, service, stop, i) for i in range(4)]
            for f in futures:
                f.result()
        empty, unhealthy = {"not asked yet": ""}, {"not asked yet": ""}
        deadline = time.time() + 60
        while (empty or unhealthy) and time.time() < deadline:
            time.sleep(2)
            empty = {w: e for w, e in _queries() if not _series(api, e)}
            unhealthy = _unhealthy_rules(api)
        assert not empty, empty
        assert not unhealthy, unhealthy
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _load(url: str, stop: float, client: int) -> None:
    i = 0
    while time.time() < stop:
        _send(url, client + i)
        i += 1


def _unhealthy_rules(api: str) -> dict[str, str]:
    """Alert rules not evaluated yet, or whose last evaluation failed (e.g. a vector match
    that the real series' labels make ambiguous), with the error."""
    try:
        groups = requests.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
    except requests.ConnectionError:  # still starting
        return {"prometheus": "not answering"}
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    if set(rules) != {a.name for a in dashboards.ALERT_RULES}:
        return {"rules loaded": str(sorted(rules))}
    return {n: r.get("lastError") or r["health"] for n, r in rules.items() if r["health"] != "ok"}


def _series(api: str, expr: str) -> list:
    try:
        resp = requests.get(f"{api}/query", params={"query": expr}, timeout=10)
    except requests.ConnectionError:  # still starting
        return []
    if resp.status_code == 503:  # still starting
        return []
    body = resp.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]
