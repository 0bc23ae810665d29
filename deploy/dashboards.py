"""The Grafana board (deploy/grafana/mis-serve.json) and the Prometheus alert rules
(deploy/prometheus/alerts.yaml): `python -m deploy.dashboards` writes both, `--check` exits 1
when a written file differs (tests/test_dashboards.py checks it, parses every query with
promtool and finds every metric it names in a live scrape of the service).

Metrics: README "Metrics" (ours, `ray_mis_*`, serve_app/metrics.py) and Ray Serve's own
(`ray_serve_*`). Every series carries Serve's `application`, `deployment` and `replica` tags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "mis-serve.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

LATENCY_OBJECTIVE_S = 2.5  # p99 of answered requests, per route (a bucket bound of LATENCY_S)
ERROR_RATIO = 0.05  # 5xx answers over all answers
RESTARTS = 2  # replicas started beyond scale-ups in 15 minutes

APP = 'application=~"$application"'
W = "$__rate_interval"  # Grafana's rate window: at least 4 scrape intervals


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"


def _rate(metric: str, labels: str = APP, by: str = "", window: str = W) -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{{{labels}}}[{window}]))"


def _quantile(q: float, metric: str, by: str, labels: str = APP, window: str = W) -> str:
    inner = _rate(f"{metric}_bucket", labels, f"{by}, le" if by else "le", window)
    return f"histogram_quantile({q}, {inner})"


def _or_zero(expr: str, like: str) -> str:
    """`expr`, or 0 for each series of `like` where `expr` has none: a counter that only
    exists after its first event (an error, a compile, a cache hit) reads 0 before it."""
    return f"({expr} or {like} * 0)"


SCORER = f'{APP}, deployment="Scorer"'
COMPILES = "ray_mis_compilations_after_warmup_total"
HITS, MISSES = "ray_mis_prefix_cache_hits_total", "ray_mis_prefix_cache_misses_total"
_hits = f"sum(rate({HITS}{{{APP}}}[{W}]) or rate({MISSES}{{{APP}}}[{W}]) * 0)"
_misses = f"sum(rate({MISSES}{{{APP}}}[{W}]) or rate({HITS}{{{APP}}}[{W}]) * 0)"

PANELS = (
    Panel(
        "Requests by route",
        "Answered scoring requests per second (200s), by route (score: /v1/score and the "
        "shapes built on it; rerank: /v1/rerank).",
        (Query(_rate("ray_mis_request_latency_s_count", by="route"), "{{route}}"),),
        "reqps",
    ),
    Panel(
        "Items by route",
        "Items (documents) per second of answered requests, by route; and items the scorers' "
        "engines scored (retried chunks count again).",
        (
            Query(_rate("ray_mis_request_items_total", by="route"), "{{route}}"),
            Query(_rate("ray_mis_items_scored_total"), "scored by engines"),
        ),
        "ops",
    ),
    Panel(
        "Latency by route",
        "p50, p95 and p99 of answered requests, by route (ingress in to response out).",
        tuple(
            Query(
                _quantile(q, "ray_mis_request_latency_s", "route"),
                f"p{round(q * 100)} {{{{route}}}}",
            )
            for q in (0.5, 0.95, 0.99)
        ),
        "s",
    ),
    Panel(
        "Chunk queue depth",
        "Chunk calls each Scorer replica holds (waiting for the batcher or in the engine), and "
        "chunk calls waiting at the ingress' router for a replica.",
        (
            Query(
                f"sum by (replica) (ray_serve_replica_processing_queries{{{SCORER}}})",
                "held by {{replica}}",
            ),
            Query(f"sum(ray_serve_deployment_queued_queries{{{SCORER}}})", "waiting at the router"),
        ),
    ),
    Panel(
        "Queue wait",
        "Time a chunk waits in a Scorer replica before the engine call that takes it starts.",
        tuple(
            Query(_quantile(q, "ray_mis_queue_wait_s", ""), f"p{round(q * 100)}")
            for q in (0.5, 0.99)
        ),
        "s",
    ),
    Panel(
        "Batch fill",
        "Chunks (of any requests) the batcher packs into one engine call: the mean and p95. "
        "Near 1 under load: the engine runs one chunk at a time; chunks bigger than "
        "fanout.chunk_items or engine.max_batch_tokens would fill it more.",
        (
            Query(
                f"{_rate('ray_mis_batch_chunks_sum')} / {_rate('ray_mis_batch_chunks_count')}",
                "mean",
            ),
            Query(_quantile(0.95, "ray_mis_batch_chunks", ""), "p95"),
        ),
    ),
    Panel(
        "Prefix-cache hit ratio",
        "Chunks whose query K/V the scorer found cached over all chunks (prefix mode): the "
        "affinity router keeps a query on the replicas that hold it.",
        (Query(f"{_hits} / ({_hits} + {_misses})", "hit ratio"),),
        "percentunit",
    ),
    Panel(
        "Compilations after ready",
        "Programs compiled after a Scorer replica's warm-up, per replica: 0 with warmup on; "
        "each one stalled that replica's traffic for seconds (its log says which shape).",
        (
            Query(
                _or_zero(
                    f"sum by (replica) (increase({COMPILES}{{{SCORER}}}[{W}]))",
                    f"sum by (replica) (ray_serve_deployment_replica_healthy{{{SCORER}}})",
                ),
                "{{replica}}",
            ),
        ),
    ),
    Panel(
        "Ready replicas",
        "Replicas that passed Serve's health checks (a Scorer is ready once its warm-up is "
        "done), and the count Serve's autoscaling asks for.",
        (
            Query(
                f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})",
                "{{deployment}} ready",
            ),
            Query(
                f"sum by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})",
                "{{deployment}} target",
            ),
        ),
    ),
    Panel(
        "Errors by status code",
        "Error answers per second by HTTP status (4xx: the client's, 5xx: ours; the front "
        "door's 401/413/503 included).",
        (Query(_rate("ray_mis_errors_total", by="code"), "{{code}}"),),
        "reqps",
    ),
)


@dataclasses.dataclass(frozen=True)
class Alert:
    """Fires when `quantity op threshold` holds for `for_`; `quantity` is what the board or an
    operator would plot (tests/test_dashboards.py checks it returns series under load)."""

    name: str
    quantity: str
    op: str
    threshold: float
    for_: str
    severity: str
    summary: str
    description: str
    extra: str = ""  # `or ...`: also fire on this (e.g. the series being absent)

    @property
    def expr(self) -> str:
        expr = f"{self.quantity} {self.op} {self.threshold:g}"
        return f"({expr}) or {self.extra}" if self.extra else expr


_healthy = 'ray_serve_deployment_replica_healthy{deployment="Scorer"}'
_answered = "sum by (application) (rate(ray_mis_request_latency_s_count[5m]))"
_fivexx = 'sum by (application) (rate(ray_mis_errors_total{code=~"5.."}[5m]))'
_errors = "sum by (application) (rate(ray_mis_errors_total[5m]))"
_starts = "ray_serve_deployment_replica_starts_total"
_target = "ray_serve_autoscaling_target_replicas"

ALERT_RULES = (
    Alert(
        "MisServeNoReadyScorer",
        f"sum by (application) ({_healthy})",
        "<",
        1,
        "2m",
        "critical",
        "No ready Scorer replica in {{ $labels.application }}",
        "Every scoring request is answered 503 (no scorer replica is ready yet). Starting "
        "replicas compile their warm-up first; check the Serve logs and the Ray autoscaler "
        "(pending pods, a slice that cannot be placed).",
        f"absent({_healthy})",
    ),
    Alert(
        "MisServeLatencyP99High",
        "histogram_quantile(0.99, sum by (application, route, le) "
        "(rate(ray_mis_request_latency_s_bucket[5m])))",
        ">",
        LATENCY_OBJECTIVE_S,
        "10m",
        "warning",
        "p99 of {{ $labels.route }} requests over " + f"{LATENCY_OBJECTIVE_S:g} s",
        "p99 latency of answered requests is {{ $value | humanizeDuration }}: queues in the "
        "Scorer replicas (board: chunk queue depth, queue wait) or too few replicas for the "
        "load (max_replicas reached?).",
    ),
    Alert(
        "MisServe5xxRatioHigh",
        f"{_or_zero(_fivexx, _answered)} / ({_answered} + {_or_zero(_errors, _answered)})",
        ">",
        ERROR_RATIO,
        "5m",
        "critical",
        "5xx answers over " + f"{ERROR_RATIO:.0%} in " + "{{ $labels.application }}",
        "{{ $value | humanizePercentage }} of answers are 5xx (503: overloaded or no scorer "
        "ready; 500: a chunk failed, see the ingress log; 504: request_timeout_s).",
    ),
    Alert(
        "MisServeCompilesAfterReady",
        _or_zero(
            "sum by (application) (increase(ray_mis_compilations_after_warmup_total[15m]))",
            f"sum by (application) ({_healthy})",
        ),
        ">",
        0,
        "0m",
        "warning",
        "Scorer replicas compiled programs after warm-up in {{ $labels.application }}",
        "A shape the warm-up did not cover stalled a replica for seconds per program; the "
        "replica's log names it (warmup off, or a bug: README Metrics).",
    ),
    Alert(
        "MisServeReplicasRestarting",
        f"count by (application, deployment) (max_over_time({_starts}[15m]) unless {_starts} "
        f"offset 15m) - sum by (application, deployment) "
        f"(clamp_min(delta({_target}[15m]), 0))",
        ">",
        RESTARTS,
        "0m",
        "warning",
        "{{ $labels.deployment }} replicas restarting in {{ $labels.application }}",
        "{{ $value }} replicas started in 15 minutes beyond what autoscaling added: replicas "
        "are dying (a failed engine, a lost slice host, OOM) and Serve replaces them.",
    ),
)


def concrete(expr: str) -> str:
    """A board query with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    return expr.replace("$__rate_interval", "1m").replace("$application", ".*")


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers,
    ranges, strings and grouping clauses that are neither functions nor keywords."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", s):
        if m[0].lower() in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m[0])
    return names


def _target(q: Query, ref: str) -> dict[str, Any]:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": q.expr,
        "legendFormat": q.legend,
        "refId": ref,
    }


def _panel(i: int, p: Panel) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": p.title,
        "description": p.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": p.unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [_target(q, chr(ord("A") + j)) for j, q in enumerate(p.queries)],
    }


def dashboard() -> dict[str, Any]:
    """Importable as is (Dashboards > Import): the data source is a variable, so the board
    needs no edits on any Grafana with a Prometheus data source."""
    app_query = "label_values(ray_mis_request_latency_s_count, application)"
    return {
        "uid": "mis-serve",
        "title": "mis-serve",
        "description": "Multi-item scoring on Ray Serve (README: Dashboards and alerts).",
        "tags": ["mis-serve", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                {
                    "name": "application",
                    "label": "Application",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": app_query, "refId": "application"},
                    "definition": app_query,
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                },
            ]
        },
        "panels": [_panel(i, p) for i, p in enumerate(PANELS)],
    }


def alert_rules() -> dict[str, Any]:
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {"summary": a.summary, "description": a.description},
        }
        for a in ALERT_RULES
    ]
    return {"groups": [{"name": "mis-serve", "rules": rules}]}


def render() -> dict[Path, str]:
    head = (
        "# Generated by `python -m deploy.dashboards` (deploy/dashboards.py): edit that and\n"
        "# regenerate. Checked: promtool check rules / test rules "
        "(deploy/prometheus/alerts.test.yaml).\n"
    )
    return {
        DASHBOARD: json.dumps(dashboard(), indent=2) + "\n",
        ALERTS: head + yaml.safe_dump(alert_rules(), sort_keys=False, width=100),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = p.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale (run python -m deploy.dashboards):", *stale, sep="\n  ", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
