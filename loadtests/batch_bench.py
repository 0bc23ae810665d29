"""`mis-score batch` against the same scorer without Ray, end to end, rounds alternated.

    python -m loadtests.batch_bench [--requests 100 --items 200] [--batch-rows 1,64]
        [--rounds 3] [--cli] [--out results.json]

Both sides score the same JSONL file of requests (labels and softmax in every row) with the
same engine settings (configs/config.yaml's, on its demo model), each run a fresh process,
timed from its start to its exit (Python and JAX start, engine start and warm-up, Ray's start
and the input scan for `batch`, scoring, writing):

- `local`: what an engine actor of `batch` runs, in one process without Ray: the same engine
  (compilation cache, warm-up), the same row scorer (mis_score.batch.RowScorer), B rows per
  engine call, the output lines written in order. At B = 1 this is `mis-score score`'s work
  (one request per engine call) plus its warm-up.
- `batch`: `mis-score batch --address local --num-engines 1 --batch-rows B` (a new local Ray
  cluster each run).
- `cli` (--cli, B = 1 only): `mis-score score` itself (no warm-up, no compilation cache: it
  compiles each shape when it first needs it).

So batch / local at one B is what Ray Data costs or gains end to end, with one engine on one
machine (cluster start, the scan, the actor pool, reading and writing beside the engine);
local B=64 / local B=1 is what packing 64 requests per engine call gains. The compilation
cache is filled once before the rounds (a run not counted), as a deployed cluster's is.
The machine's load average (/proc/loadavg) is recorded before each run: on a shared machine
compare runs of one round, and read the spread. Every output is compared bit for bit with the
first. Prints JSON and a table: per side and B the median (min-max) over the rounds of the end
to end time and rate, of the time not spent scoring (end to end less the scoring window: for
`batch` from its first engine ready to its last row written) and of the rate in the scoring
window; then batch / local per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABELS = [9454, 2753]


def write_input(path: Path, n_requests: int, n_items: int, seed: int = 0) -> None:
    """Token-id requests: query 100-300 tokens, items 8-40 tokens, labels Yes/No, softmax."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n_requests):
            query = rng.integers(0, 151_000, int(rng.integers(100, 301))).tolist()
            lengths = rng.integers(8, 41, n_items)
            items = [rng.integers(0, 151_000, int(n)).tolist() for n in lengths]
            # No id column: `mis-score score` takes request bodies only.
            row = {"query": query, "items": items, "label_token_ids": LABELS}
            f.write(json.dumps(row | {"apply_softmax": True}) + "\n")


# ------------------------------------------------------------------ the runs (child processes)


def run_local(config: str, src: str, out: str, batch_rows: int) -> dict[str, Any]:
    """The `local` side, in this process: an engine actor's work without Ray."""
    from mis_score.batch import BatchSettings, Layout, RowScorer, _out_line, _parse_line
    from mis_score.offline import OfflineScorer
    from models.checkpoint import cache_root, ensure_demo_checkpoint
    from models.engine import ScoringEngine, use_compilation_cache

    settings = BatchSettings.from_serve_config(config)
    use_compilation_cache(cache_root() / "jax")
    start = time.perf_counter()
    path = settings.model.path or ensure_demo_checkpoint(settings.model.demo_preset)
    engine = ScoringEngine(path, settings.engine)
    engine.warmup()
    ready = time.perf_counter()
    scorer = OfflineScorer(engine, settings.model_name(), settings.max_items_per_request)
    rows = RowScorer(scorer, settings.defaults, Layout.REQUESTS)
    lines = Path(src).read_text().splitlines()
    with open(out, "w") as f:
        for i in range(0, len(lines), batch_rows):
            batch = [_parse_line(line) for line in lines[i : i + batch_rows]]
            results = rows.score_rows(batch)
            pairs = zip(batch, results, strict=True)
            f.write("".join(_out_line(r, res) + "\n" for r, res in pairs))
    done = time.perf_counter()
    return {"warmup_s": ready - start, "scoring_s": done - ready, "stats": engine.stats()}


def _child(args: argparse.Namespace) -> int:
    result = run_local(args.config, args.input, args.output, args.child_batch_rows)
    Path(args.child_result).write_text(json.dumps(result))
    return 0


def _command(side: str, config: str, src: Path, out: Path, rows: int, info: Path) -> list[str]:
    py = sys.executable
    if side == "local":
        return [py, "-m", "loadtests.batch_bench", "--config", config, "--child-batch-rows",
                str(rows), "--input", str(src), "--output", str(out),
                "--child-result", str(info)]  # fmt: skip
    if side == "batch":
        return [py, "-m", "mis_score", "batch", "--config", config, "--input", str(src),
                "--output", str(out), "--address", "local", "--num-engines", "1",
                "--batch-rows", str(rows), "--summary", str(info)]  # fmt: skip
    from mis_score.batch import BatchSettings
    from models.checkpoint import ensure_demo_checkpoint

    settings = BatchSettings.from_serve_config(config)
    path = settings.model.path or ensure_demo_checkpoint(settings.model.demo_preset)
    engine = settings.engine.model_dump(mode="json", exclude={"prefix_pool_tokens"})
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine.items() if v is not None]
    return [py, "-m", "mis_score", "score", "--model-path", str(path), *flags,
            "--max-items", str(settings.max_items_per_request), "--input", str(src),
            "--output", str(out)]  # fmt: skip


def _scores(side: str, out: Path) -> list[Any]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return [r.get("scores") for r in rows]


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_one(side: str, config: str, src: Path, rows: int, tmp: Path) -> dict[str, Any]:
    out, info = tmp / f"{side}-{rows}.jsonl", tmp / f"{side}-{rows}.json"
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    load = _load()
    start = time.perf_counter()
    done = subprocess.run(
        _command(side, config, src, out, rows, info), cwd=REPO, env=env, capture_output=True
    )
    seconds = time.perf_counter() - start
    run = {"side": side, "batch_rows": rows, "seconds": seconds, "load_before": load}
    if done.returncode:  # kept, counted and left out of the figures (e.g. Ray did not start)
        lines = done.stderr.decode(errors="replace").strip().splitlines() or [""]
        return run | {"failed": f"exit {done.returncode}: {lines[-1][:300]}"}
    if side == "local":
        run |= json.loads(info.read_text())
    elif side == "batch":
        summary = json.loads(info.read_text())
        run |= {
            "job_s": summary["seconds"],
            "scoring_s": summary["scoring_seconds"],
            "scan_s": summary["scan_seconds"],
            "warmup_s": max(e["warmup_s"] for e in summary["engines"]),
            "compiles_during_job": sum(e["compiles_during_job"] for e in summary["engines"]),
        }
    run["load_after"] = _load()
    run["scores"] = _scores(side, out)
    return run


# ------------------------------------------------------------------ the bench


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "config.yaml"))
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--items", type=int, default=200, help="items per request")
    p.add_argument("--batch-rows", default="1,64", help="requests per engine call, both sides")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cli", action="store_true", help="also `mis-score score` (B = 1)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    # A `local` run (the bench starts itself as the child process).
    p.add_argument("--child-batch-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_batch_rows:
        return _child(args)

    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    src = tmp / "in.jsonl"
    write_input(src, args.requests, args.items)
    n_items = args.requests * args.items
    sizes = [int(b) for b in args.batch_rows.split(",")]
    # The compilation cache filled (and the demo checkpoint written) by a run not counted.
    write_input(tmp / "one.jsonl", 1, 1)
    run_one("local", args.config, tmp / "one.jsonl", 1, tmp)

    pairs = [("local", b) for b in sizes] + [("batch", b) for b in sizes]
    if args.cli and 1 in sizes:
        pairs.append(("cli", 1))
    runs, reference = [], None
    result: dict[str, Any] = {
        "input": {"requests": args.requests, "items": n_items},
        "host": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
    }
    for r in range(args.rounds):
        order = pairs if r % 2 == 0 else pairs[::-1]  # alternated: each side first in turn
        for side, rows in order:
            run = run_one(side, args.config, src, rows, tmp) | {"round": r}
            if "failed" not in run:
                scores = run.pop("scores")
                reference = reference if reference is not None else scores
                run["bit_identical"] = scores == reference
                run["items_per_s"] = n_items / run["seconds"]
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
            if args.out:  # so far: a bench stopped part-way keeps its runs
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    def of(side: str, rows: int) -> dict[int, dict[str, Any]]:
        """The runs that completed, by round."""
        got = (x for x in runs if x["side"] == side and x["batch_rows"] == rows)
        return {x["round"]: x for x in got if "failed" not in x}

    def per_round(a: dict[int, dict], z: dict[int, dict]) -> list[float]:
        """z's rate over a's in each round where both completed."""
        return [a[r]["seconds"] / z[r]["seconds"] for r in sorted(a.keys() & z.keys())]

    ratios = {f"batch/local B={b}": per_round(of("local", b), of("batch", b)) for b in sizes}
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        ratios[f"local B={hi}/B={lo}"] = per_round(of("local", lo), of("local", hi))
    result |= {
        "ratios_per_round": ratios,
        "failed_runs": sum("failed" in x for x in runs),
        "bit_identical": all(x.get("bit_identical", True) for x in runs),
    }
    print(json.dumps(result, indent=1))
    print()
    print(
        "| side | B | end-to-end s | items/s end to end | not scoring s | scoring items/s | load |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, rows in pairs:
        got = list(of(side, rows).values())
        if not got:
            print(f"| {side} | {rows} | no run completed | | | | |")
            continue
        secs = [x["seconds"] for x in got]
        rates = [x["items_per_s"] for x in got]
        scoring = [n_items / x["scoring_s"] for x in got if "scoring_s" in x]
        rest = [x["seconds"] - x["scoring_s"] for x in got if "scoring_s" in x]
        loads = [x["load_before"] for x in got]
        print(
            f"| {side} | {rows} | {_spread(secs)} | {_spread(rates)} | "
            f"{_spread(rest) if rest else '-'} | {_spread(scoring) if scoring else '-'} | "
            f"{min(loads):.1f}-{max(loads):.1f} |"
        )
    for name, values in ratios.items():
        print(f"{name} (items/s, per round): " + ", ".join(f"{v:.2f}" for v in values))
    print(f"bit-identical: {result['bit_identical']}; runs failed: {result['failed_runs']}")
    for x in runs:
        if "failed" in x:
            print(f"failed: round {x['round']} {x['side']} B={x['batch_rows']}: {x['failed']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["bit_identical"] else 1


def _cpu() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
