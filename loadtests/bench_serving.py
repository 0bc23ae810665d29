"""Serving benchmark: a closed-loop concurrency sweep against a running deployment, side by side
with the offline engine scoring the same requests in batches, in the same run.

    bash scripts/serve.sh                      # or serve run configs/gpu.yaml, ...
    python -m loadtests.bench_serving --config configs/config.yaml

Each client sends a request, waits for the answer, sends the next (token-id bodies, so the
client does not tokenize). Per shape and client count: items/s over the timed window, p50/p99
latency, failures, answers checked bit for bit against the offline engine, and HTTP items/s over
the offline engine's items/s (the engine of the same config, same checkpoint, same requests,
each batch of requests' chunks scored in one `Engine.score` call). Compilations after warm-up
are read from the replicas' Serve logs on this machine. Prints JSON and a markdown table,
writes both and a plot (loadtests/results/serving-<name>.*). Locust (loadtests/locustfile.py)
stays the user-facing load tool; this is the measuring one.

Where a request's time goes: when the deployment runs on this machine, each level also reports
the CPU time its processes spent per answered request, by role (the HTTP proxy: HAProxy or
Serve's Python proxy; the ingress, the scorers, the rest of Ray, this client; a failed request's
CPU is in its level's total), how many cores those processes kept busy, and how many scorer
replicas were running at its end (autoscaling may change that between levels).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import yaml

from mis_api.schema import ScoreRequest
from mis_api.scoring import make_chunks, merge_scores
from mis_score.workload import NO, YES, RagWorkload
from models.checkpoint import ensure_demo_checkpoint
from models.engine import ScoringEngine
from serve_app.config import AppArgs

LABELS = [YES, NO]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Request sizes: fixed (small, reference) or drawn per request (mixed)."""

    name: str
    query_tokens: tuple[int, int]  # inclusive range
    items: tuple[int, int]
    item_tokens: tuple[int, int]

    def body(self, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        draw = lambda r: int(rng.integers(r[0], r[1] + 1))  # noqa: E731
        n = draw(self.items)
        return {
            "query": rng.integers(0, 151_000, draw(self.query_tokens)).tolist(),
            "items": [rng.integers(0, 151_000, draw(self.item_tokens)).tolist() for _ in range(n)],
            "label_token_ids": LABELS,
        }


SHAPES: dict[str, Shape | RagWorkload] = {
    # What production rankers send (issue 12): one query, 10 items.
    "small": Shape("small", (120, 120), (10, 10), (18, 18)),
    # DESIGN.md section 5.
    "reference": Shape("reference", (2000, 2000), (500, 500), (20, 20)),
    # Random sizes within the CPU config's limits: for compilations after ready.
    "mixed": Shape("mixed", (1, 1000), (1, 200), (1, 64)),
    # Issue 41: a RAG pipeline's rerank call, 100 documents of 50-1,000 tokens (`mis-score
    # bench --workload rag` times the same bodies offline against transformers).
    "rag": RagWorkload(),
}


@dataclasses.dataclass
class Level:
    shape: str
    clients: int
    requests: int = 0
    failures: int = 0
    items_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    checked: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0  # over the checked answers, vs the offline engine
    offline_items_per_s: float | None = None
    ratio: float | None = None
    # CPU of each role over the level (its failed requests included) per answered request
    cpu_ms_per_request: dict[str, float] = dataclasses.field(default_factory=dict)
    cores_busy: float | None = None  # CPU seconds of those processes per wall second
    scorer_replicas: int | None = None  # scorer processes at the end of the level


# Ray sets each worker's process title to its actor: these name the roles (first match wins).
ROLES = (
    ("proxy", "ProxyActor"),  # Serve's Python proxy (idle but for health checks under HAProxy)
    ("proxy", "HAProxy"),  # the actor that manages HAProxy
    ("proxy", "bin/haproxy"),
    ("ingress", "ScoreIngress"),
    ("scorer", "Scorer"),
    ("ray other", "ray::"),
    ("ray other", "raylet"),
    ("ray other", "gcs_server"),
    ("ray other", "ray/dashboard"),
    ("ray other", "ray/_private"),
)


def cpu_by_role() -> dict[tuple[int, float], tuple[str, float]]:
    """(pid, start time) -> (role, CPU seconds so far) of this machine's Serve/Ray processes
    and this one."""
    out: dict[tuple[int, float], tuple[str, float]] = {}
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            role = "client" if proc.pid == os.getpid() else None
            role = role or next((r for r, key in ROLES if key in cmd), None)
            if role is not None:
                t = proc.cpu_times()
                out[proc.pid, proc.info["create_time"]] = (role, t.user + t.system)
        except psutil.Error:  # gone meanwhile
            continue
    return out


def cpu_spent(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two cpu_by_role() snapshots. A process that started in
    between counts from zero (a new replica's start-up included); one that ended in between
    is not counted."""
    spent: dict[str, float] = {}
    for key, (role, t) in after.items():
        spent[role] = spent.get(role, 0.0) + t - before.get(key, (role, 0.0))[1]
    return spent


class Offline:
    """The deployment's engine in this process: the same config and checkpoint."""

    def __init__(self, app: AppArgs):
        path = app.model.path or str(ensure_demo_checkpoint(app.model.demo_preset))
        self.app = app
        self.engine = ScoringEngine(path, app.engine, app.model.adapters)
        self.engine.warmup()

    def score(self, bodies: list[dict]) -> list[np.ndarray]:
        """Every body's scores from one engine call over all their chunks."""
        f = self.app.fanout
        per_body, chunks = [], []
        for b in bodies:
            req = ScoreRequest.model_validate(b)
            adapter = req.model if req.model in self.app.model.adapters else None
            cs = make_chunks(req, b["query"], b["items"], f.chunk_items, f.chunk_tokens, adapter)
            per_body.append(len(cs))
            chunks += cs
        out = self.engine.score(chunks)
        scores, at = [], 0
        for n in per_body:
            scores.append(merge_scores(out[at : at + n], len(LABELS)))
            at += n
        return scores

    def items_per_s(self, bodies: list[dict], min_s: float) -> float:
        """Batches of requests (about 500 items each) until `min_s` seconds have passed."""
        per_batch = max(1, 500 // max(1, int(np.mean([len(b["items"]) for b in bodies]))))
        items, elapsed, i = 0, 0.0, 0
        while elapsed < min_s or i == 0:
            batch = [bodies[(i + j) % len(bodies)] for j in range(per_batch)]
            start = time.perf_counter()
            self.score(batch)
            elapsed += time.perf_counter() - start
            items += sum(len(b["items"]) for b in batch)
            i += per_batch
        return items / elapsed


async def _sweep_level(
    url: str, bodies: list[bytes], clients: int, warm_s: float, timed_s: float
) -> tuple[float, list[tuple[float, float, int, int, int, bytes]]]:
    """When the level started, and (start, end, status, items, body index, response) of
    every request."""
    done: list[tuple[float, float, int, int, int, bytes]] = []
    t0 = time.perf_counter()
    stop_at = t0 + warm_s + timed_s
    counter = iter(range(10**9))
    n_items = [len(json.loads(b)["items"]) for b in bodies]
    timeout = aiohttp.ClientTimeout(total=600)
    limits = aiohttp.TCPConnector(limit=clients)

    async with aiohttp.ClientSession(timeout=timeout, connector=limits) as session:

        async def client() -> None:
            while time.perf_counter() < stop_at:
                i = next(counter) % len(bodies)
                start = time.perf_counter()
                try:
                    async with session.post(
                        f"{url}/v1/score",
                        data=bodies[i],
                        headers={"content-type": "application/json"},
                    ) as r:
                        payload, status = await r.read(), r.status
                except aiohttp.ClientError:
                    payload, status = b"", 0
                done.append((start, time.perf_counter(), status, n_items[i], i, payload))

        await asyncio.gather(*(client() for _ in range(clients)))
    return t0, done


def _compiles_after_warmup(session_dir: str) -> int | None:
    """Sum of the replicas' "compiled N programs after warm-up" log lines on this machine."""
    files = glob.glob(os.path.join(session_dir, "logs", "serve", "replica_*Scorer*.log"))
    if not files:
        return None
    pattern = re.compile(r"compiled (\d+) programs after warm-up")
    return sum(int(m.group(1)) for f in files for m in pattern.finditer(Path(f).read_text()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load(Path(args.config).read_text())
    app = AppArgs.parse(raw["applications"][0].get("args") or {})
    offline = Offline(app)
    compiles_before = _compiles_after_warmup(args.ray_session)
    levels: list[Level] = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        bodies = [shape.body(seed) for seed in range(args.pool)]
        if args.adapters:  # requests cycle over the config's adapters and the base
            names = [None, *app.model.adapters]
            for i, b in enumerate(bodies):
                if names[i % len(names)] is not None:
                    b["model"] = names[i % len(names)]
        encoded = [json.dumps(b).encode() for b in bodies]
        want = {i: s for i, s in enumerate(offline.score(bodies[: args.check]))}
        offline_rate = offline.items_per_s(bodies, args.offline_s)
        for clients in args.clients:
            cpu_before, wall = cpu_by_role(), time.perf_counter()
            t0, every = asyncio.run(
                _sweep_level(args.url, encoded, clients, args.warm_s, args.duration_s)
            )
            wall = time.perf_counter() - wall
            cpu_after = cpu_by_role()
            spent = cpu_spent(cpu_before, cpu_after)
            answers = [a for a in every if a[1] >= t0 + args.warm_s]  # the timed window
            ok = [a for a in answers if a[2] == 200]
            lat = np.array([1e3 * (a[1] - a[0]) for a in ok]) if ok else np.array([])
            lv = Level(shape_name, clients, requests=len(answers))
            lv.scorer_replicas = sum(role == "scorer" for role, _ in cpu_after.values()) or None
            lv.failures = len(answers) - len(ok)
            lv.items_per_s = sum(a[3] for a in ok) / args.duration_s
            if ok:
                lv.p50_ms, lv.p99_ms = (float(np.percentile(lat, q)) for q in (50, 99))
            for a in ok:
                if a[4] in want:
                    lv.checked += 1
                    got = np.array(json.loads(a[5])["scores"])
                    lv.mismatches += int(not np.array_equal(got, want[a[4]]))
                    diff = float(np.abs(got - want[a[4]]).max())
                    lv.max_abs_diff = max(lv.max_abs_diff, diff)
            if n_ok := sum(a[2] == 200 for a in every):
                lv.cpu_ms_per_request = {r: round(1e3 * t / n_ok, 2) for r, t in spent.items()}
                lv.cores_busy = round(sum(spent.values()) / wall, 2)
            lv.offline_items_per_s = offline_rate
            lv.ratio = lv.items_per_s / offline_rate
            levels.append(lv)
            print(json.dumps(dataclasses.asdict(lv)), flush=True)
    compiles_after = _compiles_after_warmup(args.ray_session)
    return {
        "config": args.config,
        "url": args.url,
        "engine": app.engine.model_dump(mode="json"),
        "fanout": app.fanout.model_dump(mode="json"),
        "duration_s": args.duration_s,
        "levels": [dataclasses.asdict(lv) for lv in levels],
        "compiles_after_warmup": None
        if compiles_before is None or compiles_after is None
        else compiles_after - compiles_before,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Serving sweep, {result['config']}, {result['duration_s']:.0f} s per level; "
        f"compilations after warm-up during the sweep: {result['compiles_after_warmup']}",
        "",
        "| shape | clients | items/s | p50 ms | p99 ms | failures | answers checked / "
        "not bit-identical (max abs diff) | offline engine items/s | HTTP / offline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for lv in result["levels"]:
        lines.append(
            f"| {lv['shape']} | {lv['clients']} | {lv['items_per_s']:.0f} | "
            f"{fmt(lv['p50_ms'], '.0f')} | {fmt(lv['p99_ms'], '.0f')} | {lv['failures']} | "
            f"{lv['checked']} / {lv['mismatches']} ({lv['max_abs_diff']:.1e}) | "
            f"{fmt(lv['offline_items_per_s'], '.0f')} | "
            f"{fmt(lv['ratio'], '.2f')} |"
        )
    roles = list(dict.fromkeys(r for lv in result["levels"] for r in lv["cpu_ms_per_request"]))
    if roles:
        lines += [
            "",
            "CPU time per answered request, ms, by process role (cores busy: their CPU s per "
            "wall s; scorers: replicas running at the end of the level)",
            "",
            "| shape | clients | scorers | " + " | ".join(roles) + " | cores busy |",
            "|---|---|---|" + "---|" * (len(roles) + 1),
        ]
        for lv in result["levels"]:
            cpu = lv["cpu_ms_per_request"]
            cells = " | ".join(fmt(cpu.get(r), ".1f") for r in roles)
            lines.append(
                f"| {lv['shape']} | {lv['clients']} | {fmt(lv.get('scorer_replicas'), 'd')} | "
                f"{cells} | {fmt(lv['cores_busy'], '.2f')} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for shape in dict.fromkeys(lv["shape"] for lv in result["levels"]):
        rows = [lv for lv in result["levels"] if lv["shape"] == shape]
        x = [lv["clients"] for lv in rows]
        (line,) = ax1.plot(x, [lv["items_per_s"] for lv in rows], "o-", label=f"{shape} HTTP")
        ax1.axhline(rows[0]["offline_items_per_s"], ls="--", color=line.get_color(),
                    label=f"{shape} offline engine")  # fmt: skip
        ax2.plot(x, [lv["p99_ms"] or np.nan for lv in rows], "o-", label=shape)
    for ax, ylabel in ((ax1, "items/s"), (ax2, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(f"mis-serve, {result['config']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--config", default="configs/config.yaml", help="the deployment's config")
    p.add_argument("--shapes", default="small,reference", help=f"of {sorted(SHAPES)}")
    p.add_argument("--clients", default="1,8,32,64,128")
    p.add_argument("--duration-s", type=float, default=20.0, help="timed window per level")
    p.add_argument("--warm-s", type=float, default=3.0, help="untimed start of each level")
    p.add_argument("--offline-s", type=float, default=10.0, help="offline engine timing")
    p.add_argument("--pool", type=int, default=256, help="distinct requests per shape")
    p.add_argument("--check", type=int, default=32, help="requests checked bit for bit")
    p.add_argument("--ray-session", default="/tmp/ray/session_latest", help="for the logs")
    p.add_argument(
        "--adapters",
        action="store_true",
        help="requests cycle over the config's model.adapters and the base (`model`)",
    )
    p.add_argument("--name", default="cpu")
    p.add_argument("--out", default="loadtests/results")
    args = p.parse_args()
    args.shapes = args.shapes.split(",")
    args.clients = [int(c) for c in args.clients.split(",")]
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serving-{args.name}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / f"serving-{args.name}.md").write_text(table + "\n")
    plot(result, out / f"serving-{args.name}.png")
    print(table)


if __name__ == "__main__":
    main()
