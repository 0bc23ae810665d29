"""Soak, burst, chaos and autoscaling runs against a live deployment: Locust for a while,
with per-minute p99 latency, the status codes seen, the RSS of the Serve processes and the
Scorer replica count sampled throughout.

    python -m loadtests.soak --url http://127.0.0.1:8000 --users 2 --seconds 300 --out DIR \
        [--kill-replica-after 20] [--cooldown-s 120] [--app mis] [--api-key KEY]

`--kill-replica-after S` kills one Scorer replica actor of `--app` S seconds in.
`--cooldown-s S` keeps sampling the replica count S seconds after the load stops (or until it
is back where it began), to see an autoscaled deployment scale down. Both need the
deployment's Ray cluster (`ray.init(address="auto")` from this machine). Prints one line
and writes DIR/soak.json. Workload: MIS_QUERY_TOKENS, MIS_ITEMS, MIS_ITEM_TOKENS (the Locust
file's defaults otherwise).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil


def serve_rss_mb() -> float:
    """Resident memory of this machine's Ray Serve processes (replicas, proxy, controller)."""
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith(("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")):
            total += proc.info["memory_info"].rss
    return total / 2**20


def _connect():
    import ray

    if not ray.is_initialized():  # in-process callers (tests) are connected already
        ray.init(address="auto", log_to_driver=False)
    return ray


def scorer_replicas(app: str) -> tuple[int, int]:
    """(running, all) Scorer replicas of `app` as Serve's controller reports them; `all`
    counts replicas still starting (loading and compiling) or stopping."""
    from ray import serve

    _connect()
    states = serve.status().applications[app].deployments["Scorer"].replica_states
    return int(states.get("RUNNING", 0)), int(sum(states.values()))


def kill_one_scorer(app: str) -> str:
    """Kills one Scorer replica actor of `app` (Serve names them `SERVE_REPLICA::app#Scorer#id`;
    other applications on the cluster are left alone); Serve replaces it."""
    ray = _connect()
    prefix = f"SERVE_REPLICA::{app}#Scorer#"
    victim = next(
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    return victim["name"]


def analyse(log: Path, rss: list[tuple[float, float]], start: float, seconds: float) -> dict:
    rows = np.loadtxt(log, delimiter=",", ndmin=2) if log.exists() else np.zeros((0, 3))
    t, latency, status = rows[:, 0] - start, rows[:, 1], rows[:, 2].astype(int)
    ok = status == 200

    def p99(lo: float, hi: float) -> float | None:
        sel = ok & (t >= lo) & (t < hi)
        return float(np.percentile(latency[sel], 99)) if sel.any() else None

    first, last = p99(0, 60), p99(seconds - 60, seconds + 1e9)
    rss_mb = [m for _, m in rss]
    return {
        "seconds": seconds,
        "requests": int(len(rows)),
        "status_counts": {str(k): int(v) for k, v in collections.Counter(status).items()},
        "failures": int((~ok).sum()),
        "p99_ms_first_minute": first,
        "p99_ms_last_minute": last,
        "p99_drift": (last - first) / first if first and last else None,
        "rss_mb_first": rss_mb[0] if rss_mb else None,
        "rss_mb_last": rss_mb[-1] if rss_mb else None,
        "rss_mb_max": max(rss_mb, default=None),
        "rss_drift": (rss_mb[-1] - rss_mb[0]) / rss_mb[0] if rss_mb else None,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=2)
    p.add_argument("--seconds", type=int, default=300)
    p.add_argument("--out", default="loadtests/out/soak")
    p.add_argument("--kill-replica-after", type=float, default=None)
    p.add_argument("--cooldown-s", type=float, default=0.0)
    p.add_argument("--app", default="mis", help="Serve application whose Scorer to watch")
    p.add_argument("--api-key", default=os.environ.get("MIS_API_KEY"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "latency.csv"
    log.unlink(missing_ok=True)
    env = os.environ | {"MIS_LATENCY_LOG": str(log)}
    if a.api_key:
        env["MIS_API_KEY"] = a.api_key
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
        "--host", a.url, "-u", str(a.users), "-r", str(a.users), "-t", f"{a.seconds}s",
        "--stop-timeout", "120", "--csv", str(out / "locust"), "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    rss: list[tuple[float, float]] = []
    start = time.time()
    locust = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    killed = None
    if a.kill_replica_after is not None:

        def chaos() -> None:
            nonlocal killed
            time.sleep(a.kill_replica_after)
            killed = kill_one_scorer(a.app)

        threading.Thread(target=chaos, daemon=True).start()
    # (seconds since start, running replicas, all replicas), at each change
    timeline: list[tuple[float, int, int]] = []

    def sample_replicas() -> None:
        n = scorer_replicas(a.app)
        if not timeline or timeline[-1][1:] != n:
            timeline.append((round(time.time() - start, 1), *n))

    ticks = 0
    while locust.poll() is None:
        if ticks % 5 == 0:
            rss.append((time.time() - start, serve_rss_mb()))
        if a.cooldown_s:
            sample_replicas()
        ticks += 1
        time.sleep(1)
    load_end = time.time()
    while a.cooldown_s and time.time() - load_end < a.cooldown_s:
        sample_replicas()
        if timeline[-1][1:] == timeline[0][1:] and len(timeline) > 1:
            break  # back where it began
        time.sleep(1)
    result = analyse(log, rss, start, a.seconds) | {"killed_replica": killed, "users": a.users}
    if a.cooldown_s:
        result["replica_timeline"] = timeline
        result["load_stopped_at_s"] = round(load_end - start, 1)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    drift = result["p99_drift"]
    print(
        f"requests={result['requests']} failures={result['failures']} "
        f"status={result['status_counts']} p99 first/last minute="
        f"{result['p99_ms_first_minute']}/{result['p99_ms_last_minute']} ms "
        f"(drift {drift if drift is None else f'{100 * drift:+.1f}%'}) RSS first/last/max="
        f"{result['rss_mb_first']:.0f}/{result['rss_mb_last']:.0f}/{result['rss_mb_max']:.0f} MB"
        + (f" killed={killed}" if killed else "")
        + (f" replicas (t s, running, all)={timeline}" if timeline else "")
    )
    return result


if __name__ == "__main__":
    main()
