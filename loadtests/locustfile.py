"""Locust load test of `/v1/score` with the reference workload.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        [--query-tokens 2000 --items 500 --item-tokens 20 --labels 9454,2753]

Workload flags default to the env vars MIS_QUERY_TOKENS, MIS_ITEMS, MIS_ITEM_TOKENS,
MIS_LABELS; MIS_API_KEY is sent as a bearer token when set. How a request is cut into chunks
is a deployment setting (`fanout.chunk_items` / `fanout.chunk_tokens` in the app args), not a
request field. Every response is checked (item count, label count, probabilities in [0, 1]); a
bad payload counts as a failure.
"""

from __future__ import annotations

import itertools
import os
import time

from locust import HttpUser, events, task

from mis_score.workload import Workload, check_response

_SEEDS = itertools.count()
# Per-request log "unix time,latency ms,status" for loadtests/soak.py (per-minute p99).
_LATENCY_LOG = os.environ.get("MIS_LATENCY_LOG")


@events.request.add_listener
def _log_latency(response_time, response=None, **_) -> None:
    if _LATENCY_LOG:
        status = getattr(response, "status_code", 0)
        with open(_LATENCY_LOG, "a") as f:
            f.write(f"{time.time():.3f},{response_time:.1f},{status}\n")


@events.init_command_line_parser.add_listener
def _args(parser) -> None:
    d = Workload.from_env()
    parser.add_argument("--query-tokens", type=int, default=d.query_tokens)
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument("--item-tokens", type=int, default=d.item_tokens)
    parser.add_argument("--labels", default=",".join(map(str, d.label_ids)))


class ScoreUser(HttpUser):
    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.workload = Workload(
            o.query_tokens, o.items, o.item_tokens, tuple(int(x) for x in o.labels.split(","))
        )
        if os.environ.get("MIS_API_KEY"):  # deployments with auth.api_keys set
            self.client.headers["Authorization"] = f"Bearer {os.environ['MIS_API_KEY']}"

    @task
    def score(self) -> None:
        body = self.workload.body(seed=next(_SEEDS))
        with self.client.post(
            "/v1/score", json=body, catch_response=True, name="/v1/score"
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            problem = check_response(resp.json(), self.workload)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
