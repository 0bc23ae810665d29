"""HTTP overhead: items/s through the Serve app vs the offline engine, same workload, one run.

    python -m loadtests.bench_overhead [--preset qwen3-bench-s] [--query-tokens 2000]
        [--items 500] [--item-tokens 20] [--repeats 3] [--chunk-size 64] [--replicas 2]
        [--json OUT.json]

Both sides use the same checkpoint and engine settings; each timed request has a new query
(no prefix-cache hits), after one untimed warm-up request that compiles the shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import requests

from loadtests.workload import Workload, check_response
from models.checkpoint import ensure_demo_checkpoint
from models.engine import ScoringEngine


def _time_engine(path, args, workload: Workload, repeats: int) -> list[float]:
    engine = ScoringEngine(path, args.engine_config())

    def one(seed: int) -> float:
        b = workload.body(seed)
        start = time.perf_counter()
        engine.score_ids(
            b["query"], b["items"], b["label_token_ids"], apply_softmax=b["apply_softmax"]
        )
        return time.perf_counter() - start

    one(10_000)
    return [one(seed) for seed in range(repeats)]


def _time_http(url: str, workload: Workload, repeats: int) -> list[float]:
    def one(seed: int) -> float:
        start = time.perf_counter()
        resp = requests.post(f"{url}/v1/score", json=workload.body(seed), timeout=3600)
        elapsed = time.perf_counter() - start
        resp.raise_for_status()
        problem = check_response(resp.json(), workload)
        if problem:
            raise RuntimeError(problem)
        return elapsed

    one(20_000)
    return [one(100 + seed) for seed in range(repeats)]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="qwen3-bench-s")
    p.add_argument("--query-tokens", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--item-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    path = ensure_demo_checkpoint(a.preset)
    workload = Workload(a.query_tokens, a.items, a.item_tokens)
    app_args = AppArgs(
        model_path=str(path),
        chunk_size=a.chunk_size,
        max_query_tokens=max(8192, a.query_tokens),
        warmup_query_tokens=None,
    )
    engine_s = _time_engine(path, app_args, workload, a.repeats)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cpus = {"num_cpus": 1.0 / a.replicas}
    serve.run(
        build_graph(app_args, {"num_replicas": a.replicas, "ray_actor_options": cpus}),
        name="mis",
        route_prefix="/",
    )
    try:
        http_s = _time_http(f"http://127.0.0.1:{port}", workload, a.repeats)
    finally:
        serve.shutdown()
        ray.shutdown()

    engine_ips = a.items / statistics.median(engine_s)
    http_ips = a.items / statistics.median(http_s)
    result = {
        "workload": {
            "preset": a.preset,
            "query_tokens": a.query_tokens,
            "items": a.items,
            "item_tokens": a.item_tokens,
            "chunk_size": a.chunk_size,
            "mode": app_args.mode.value,
            "replicas": a.replicas,
            "repeats": a.repeats,
        },
        "engine": {"items_per_s": round(engine_ips, 2), "seconds": engine_s},
        "http": {"items_per_s": round(http_ips, 2), "seconds": http_s},
        "http_over_engine": round(http_ips / engine_ips, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"\n| path | items/s (median of {a.repeats}) |\n|---|---|")
    print(
        f"| offline engine | {engine_ips:.1f} |\n| HTTP, {a.replicas} replicas | "
        f"{http_ips:.1f} |\n\nHTTP / engine = {result['http_over_engine']:.3f}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
