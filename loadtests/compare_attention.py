"""The XLA block attention of this tree and of another checkout, side by side on one workload.

    git worktree add /tmp/before <commit>
    python -m loadtests.compare_attention --baseline /tmp/before [--preset qwen3-bench-s]
        [--mode prefix] [--query-tokens 2000] [--items 500] [--item-tokens 20] [--rounds 3]
        [--json F]

One request of the workload is planned into the forwards the engine runs for it (this tree's
planner, loadtests/profile_engine.py); both implementations run one layer's attention over each
of those forwards (random q/k/v and pool, the model's head shapes, float32), each with its own
default key tiles. A round times the baseline and then this tree, best of 3 per forward, summed;
rounds alternate so that the machine's drift falls on both. Before timing, the two outputs are
compared (max abs diff): a change of layout or tiling moves the last bits, never more. The
baseline's module is loaded from its file; it must read the metadata this tree's planner writes
(`BlockMeta`'s fields) and take `block` and `tile` keywords.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loadtests.bench_attention import random_inputs
from loadtests.profile_engine import request_forwards, workload_config
from mis_kernels import block_attention as current
from mis_score.workload import Workload
from models.config import PRESETS
from models.engine import pool_rows
from models.plan import Mode

EXTRA_POOL = 512


def load_baseline(tree: Path):
    path = tree / "mis_kernels" / "block_attention.py"
    if not path.is_file():
        raise SystemExit(f"--baseline: {path} does not exist")
    spec = importlib.util.spec_from_file_location("baseline_block_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def best_s(fn, args, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="the other checkout's root")
    p.add_argument("--preset", default="qwen3-bench-s", choices=sorted(PRESETS))
    p.add_argument("--mode", default="prefix", choices=["packed", "prefix"])
    p.add_argument("--query-tokens", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--item-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    baseline = load_baseline(args.baseline)

    cfg = PRESETS[args.preset]
    w = Workload(args.query_tokens, args.items, args.item_tokens)
    config = workload_config(w, mode=Mode(args.mode))
    forwards = request_forwards(w, config, seed=0)
    # Pool rows past the engine's, so a baseline with longer key tiles reads padding.
    rows = pool_rows(config) + EXTRA_POOL
    inputs = [
        (*x, f.tile)
        for x, f in zip(random_inputs(cfg, forwards, rows, jnp.float32), forwards, strict=True)
    ]
    calls: dict[str, list] = {}
    for name, module in (("baseline", baseline), ("this tree", current)):
        calls[name] = []
        for q, k, v, pk, pv, meta, tile in inputs:
            fn = jax.jit(functools.partial(module.block_attention, block=config.block, tile=tile))
            m = module.BlockMeta(*map(jnp.asarray, meta))
            calls[name].append((fn, (q, k, v, pk, pv, m)))
    outs = {
        name: [np.asarray(fn(*a)) for fn, a in c]  # compiles
        for name, c in calls.items()
    }
    diff = max(
        float(np.abs(a - b).max()) for a, b in zip(outs["baseline"], outs["this tree"], strict=True)
    )
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, c in calls.items():
            times[name].append(sum(best_s(fn, a) for fn, a in c) * 1e3)
    median = {name: float(np.median(t)) for name, t in times.items()}
    result = {
        "baseline": str(args.baseline),
        "workload": vars(w) | {"mode": args.mode, "preset": args.preset},
        "forwards": [len(f.tokens) for f in forwards],
        "device": jax.devices()[0].device_kind,
        "max_abs_diff": diff,
        "ms_per_round": times,
        "median_ms": median,
        "speedup": median["baseline"] / median["this tree"],
    }
    print(json.dumps(result))
    print("\n| attention, one layer | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)))
    print("|---|" + "---|" * args.rounds)
    for name, t in times.items():
        print(f"| {name} | " + " | ".join(f"{x:.1f} ms" for x in t) + " |")
    print(f"\nthis tree {result['speedup']:.2f}x the baseline (medians); max abs diff {diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
