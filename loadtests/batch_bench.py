"""`mis-score batch` vs `mis-score score` on the same input, side by side in one run.

    RAY_ADDRESS=local python -m loadtests.batch_bench [--requests 100 --items 200] [--pairs]

Both score the same JSONL file with the same engine settings (configs/config.yaml's, on its
demo model): `score` is mis_score.offline.OfflineScorer line by line (what `mis-score score`
runs) on an engine warmed up first; `batch` is run_batch on a local Ray cluster started here,
its items/s over its scoring window (first engine ready -> last row written; the warm-up is
not counted, as it is not for `score`). Prints JSON and a short table; the outputs are
compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from mis_score.batch import BatchSettings, run_batch
from mis_score.offline import OfflineScorer
from models.checkpoint import ensure_demo_checkpoint
from models.engine import ScoringEngine

REPO = Path(__file__).resolve().parents[1]


def write_input(path: Path, n_requests: int, n_items: int, pairs: bool, seed: int = 0) -> None:
    """Token-id requests (query 100-300 tokens, items 8-40 tokens, labels Yes/No), or the
    same as one pair per row."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for r in range(n_requests):
            query = rng.integers(0, 151_000, int(rng.integers(100, 301))).tolist()
            lengths = rng.integers(8, 41, n_items)
            items = [rng.integers(0, 151_000, int(n)).tolist() for n in lengths]
            if pairs:
                for k, item in enumerate(items):
                    f.write(json.dumps({"user": r, "cand": k, "query": query, "item": item}) + "\n")
            else:
                f.write(json.dumps({"id": r, "query": query, "items": items}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "config.yaml"))
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--items", type=int, default=200, help="items per request")
    p.add_argument("--pairs", action="store_true", help="one pair per row")
    p.add_argument("--batch-rows", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    settings = BatchSettings.from_serve_config(args.config)
    labels = {"label_token_ids": [9454, 2753], "apply_softmax": True}
    pool = {"num_engines": 1}
    if args.batch_rows:
        pool["batch_rows"] = args.batch_rows
    settings = settings.model_copy(
        update={
            "defaults": settings.defaults.model_validate(labels),
            "pool": settings.pool.model_copy(update=pool),
        }
    )
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    src = tmp / "in.jsonl"
    write_input(src, args.requests, args.items, args.pairs)
    lines = src.read_text().splitlines()

    # `mis-score score`'s path: one request body per line, one engine call each.
    path = settings.model.path or ensure_demo_checkpoint(settings.model.demo_preset)
    engine = ScoringEngine(path, settings.engine)
    engine.warmup()
    scorer = OfflineScorer(engine, settings.model_name(), settings.max_items_per_request)
    defaults = settings.defaults.model_dump(exclude_none=True)
    start = time.perf_counter()
    want = []
    for line in lines:
        row = json.loads(line)
        body = {k: v for k, v in row.items() if k in ("query", "items")}
        if "item" in row:
            body["items"] = [row["item"]]
        want.append(scorer.score_body(defaults | body)["scores"])
    score_s = time.perf_counter() - start
    n_items = args.requests * args.items

    import ray

    ray.init(address="local", include_dashboard=False)
    summary = run_batch(str(src), str(tmp / "out.jsonl"), settings)
    ray.shutdown()
    got = [json.loads(line)["scores"] for line in (tmp / "out.jsonl").read_text().splitlines()]
    if args.pairs:
        want = [w[0] for w in want]

    result = {
        "input": {"rows": len(lines), "items": n_items, "pairs": args.pairs},
        "engine": settings.engine.model_dump(mode="json"),
        "batch_rows": settings.pool.batch_rows,
        "score": {"seconds": score_s, "items_per_s": n_items / score_s},
        "batch": {
            "seconds": summary.seconds,
            "scoring_seconds": summary.scoring_seconds,
            "items_per_s": summary.items_per_s,
            "warmup_s": max(e["warmup_s"] for e in summary.engines),
            "prefix_hits": summary.totals("prefix_hits"),
            "prefix_misses": summary.totals("prefix_misses"),
            "compiles_during_job": summary.totals("compiles_during_job"),
        },
        "ratio": summary.items_per_s / (n_items / score_s),
        "bit_identical": got == want,
    }
    print(json.dumps(result, indent=1))
    print()
    print("| path | items | scoring s | items/s |")
    print("|---|---|---|---|")
    print(f"| mis-score score | {n_items} | {score_s:.1f} | {n_items / score_s:.0f} |")
    print(
        f"| mis-score batch | {summary.items} | {summary.scoring_seconds:.1f} | "
        f"{summary.items_per_s:.0f} |"
    )
    print(f"batch / score: {result['ratio']:.2f}; bit-identical: {result['bit_identical']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["bit_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
