"""Block attention alone: the XLA implementation and the Pallas kernel's settings side by side.

    python -m loadtests.bench_attention [--preset qwen3-0.6b] [--mode prefix] [--dtype bfloat16]
        [--query-tokens 2000] [--items 500] [--item-tokens 20] [--max-batch-tokens 16384]
        [--variants xla pallas pallas:rows=64 pallas:tile=32:num_warps=4 ...] [--json F]

One request of the reference workload (a new query) is planned into the forwards the engine
runs for it (loadtests/profile_engine.py). A variant's time is one layer's attention over each
of those forwards (their real metadata; random q/k/v and pool, the model's head shapes), best of
5 per forward, summed. Useful FLOPs are one layer's share of the request's attention FLOPs
(mis_score.bench.useful_flops: visible query-key pairs only), so TFLOP/s and the share of the
dense matmul peak measured in the same run say how close attention runs to the chip. Each
variant's output is first checked against the XLA implementation at the highest matmul
precision (max abs diff, relative where the output's magnitude is over 1, within the bench's
gate bound for the dtype); one over the bound, or one that does not compile, is reported failed
and not timed. The `xla` row is that reference's own program (in bfloat16 at the default
precision).

Variants: `xla` (mis_kernels/block_attention.py, the engine's key tiles), `pallas` (the kernel's
defaults) and `pallas:key=value:...` with the kernel's settings `tile`, `rows`, `num_warps`,
`num_stages` (mis_kernels/ragged_attention.py). Without --variants: xla, pallas, and on a GPU a
sweep of the kernel's settings. On a CPU the kernel runs in Pallas' interpreter: its time there is
not a speed figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loadtests.profile_engine import best_ms, request_forwards, workload_config
from mis_kernels.block_attention import BlockMeta, block_attention
from mis_kernels.ragged_attention import ragged_block_attention
from mis_score.bench import GATE_BOUND, matmul_peak_gflops, share_of_peak, useful_flops
from mis_score.workload import Workload
from models.config import PRESETS
from models.engine import KEY_TILES, pool_rows
from models.plan import Mode

PALLAS_SETTINGS = ("tile", "rows", "num_warps", "num_stages")
GPU_SWEEP = (
    "pallas:rows=64",  # one query head per program: no GQA stacking
    "pallas:tile=32",
    "pallas:tile=128",
    "pallas:num_warps=4",
    "pallas:num_stages=3",
    "pallas:tile=32:num_stages=3",
)


def parse_variant(spec: str) -> tuple[str, dict[str, int]]:
    """ "pallas:tile=32:rows=64" -> ("pallas", {"tile": 32, "rows": 64})."""
    name, *settings = spec.split(":")
    if name not in ("xla", "pallas") or (name == "xla" and settings):
        raise ValueError(f"variant {spec!r}: xla, pallas or pallas:setting=value:...")
    kw = {}
    for s in settings:
        key, _, value = s.partition("=")
        if key not in PALLAS_SETTINGS or not value.isdigit():
            raise ValueError(f"variant {spec!r}: settings are {', '.join(PALLAS_SETTINGS)}=<int>")
        kw[key] = int(value)
    if kw.get("tile", 0) > KEY_TILES[0]:  # a tile is read past a range's end: the padding
        raise ValueError(f"variant {spec!r}: the pool's padding holds tiles <= {KEY_TILES[0]}")
    return name, kw


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference, relative where |want| > 1 (a bf16 output near 4 is a 2^-5 step)."""
    return float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())


def random_inputs(cfg, forwards, pool_size: int, dtype) -> list[tuple]:
    """Per forward: random q, k, v [T, ...] in the model's head shapes, a random pool [kv heads,
    pool_size, head_dim] shared by all, and the forward's metadata (prefix, own, local_start)."""
    kv, g, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    keys = iter(jax.random.split(jax.random.key(0), 2 + 3 * len(forwards)))
    rnd = lambda *shape: jax.random.normal(next(keys), shape, dtype)  # noqa: E731
    pool_k, pool_v = rnd(kv, pool_size, hd), rnd(kv, pool_size, hd)
    return [
        (
            rnd(len(f.tokens), kv, g, hd),
            rnd(len(f.tokens), kv, hd),
            rnd(len(f.tokens), kv, hd),
            pool_k,
            pool_v,
            (f.prefix, f.own, f.local_start),
        )
        for f in forwards
    ]


def attention_fn(name: str, settings: dict[str, int], block: int, tile: int):
    """The jitted attention of one variant: (q, k, v, pool_k, pool_v, meta) -> output."""
    if name == "xla":
        return jax.jit(
            functools.partial(block_attention, block=block, tile=tile, key_tiles=KEY_TILES)
        )
    return functools.partial(ragged_block_attention, block=block, **settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    p.add_argument("--mode", default="prefix", choices=["packed", "prefix"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--query-tokens", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--item-tokens", type=int, default=20)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--variants", nargs="+", default=None, help="xla, pallas, pallas:k=v:...")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    specs = args.variants or ["xla", "pallas", *(GPU_SWEEP if backend == "gpu" else ())]
    try:
        variants = [(spec, *parse_variant(spec)) for spec in specs]
    except ValueError as e:
        p.error(str(e))

    cfg = PRESETS[args.preset]
    w = Workload(args.query_tokens, args.items, args.item_tokens)
    config = workload_config(w, mode=Mode(args.mode), max_batch_tokens=args.max_batch_tokens)
    block = config.block
    forwards = request_forwards(w, config, seed=0)
    inputs = [
        (*arrays, BlockMeta(*map(jnp.asarray, meta)))
        for *arrays, meta in random_inputs(cfg, forwards, pool_rows(config), jnp.dtype(dtype))
    ]
    tiles = [f.tile for f in forwards]
    with jax.default_matmul_precision("highest"):
        want = [
            np.asarray(attention_fn("xla", {}, block, tile)(*x), np.float32)
            for x, tile in zip(inputs, tiles, strict=True)
        ]
    flop = (
        useful_flops(cfg, w.query_tokens, [w.item_tokens] * w.items)["attention"] / cfg.num_layers
    )
    peak = matmul_peak_gflops(dtype)
    device = jax.devices()[0].device_kind
    # What is checked is what is timed: float32 at the highest precision (a GPU's default is
    # TF32), bfloat16 at the default (its products are exact in the float32 accumulators).
    precision = "highest" if dtype == "float32" else "default"

    rows: list[dict[str, Any]] = []
    for spec, name, settings in variants:
        row: dict[str, Any] = {"variant": spec, "status": "ok"}
        rows.append(row)
        fns = [attention_fn(name, settings, block, tile) for tile in tiles]
        try:  # a setting the compiler refuses, or a wrong answer: report it, go on
            with jax.default_matmul_precision(precision):
                got = [np.asarray(fn(*x), np.float32) for fn, x in zip(fns, inputs, strict=True)]
                row["max_diff"] = max(map(relative_diff, got, want))
                if not row["max_diff"] <= GATE_BOUND[dtype]:
                    raise ValueError(f"max diff {row['max_diff']:.3g} > {GATE_BOUND[dtype]}")
                row["ms_per_layer"] = sum(
                    best_ms(fn, *x) for fn, x in zip(fns, inputs, strict=True)
                )
            row["tflops"] = flop / row["ms_per_layer"] / 1e9
            share = share_of_peak(row["tflops"] * 1e3, peak, f"{spec}: attention at")
            row["pct_of_peak"] = 100 * share
        except Exception as e:
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for timed in ("ms_per_layer", "tflops"):
                row.pop(timed, None)
    xla_ms = next((r.get("ms_per_layer") for r in rows if r["variant"] == "xla"), None)
    for r in rows:
        if xla_ms and "ms_per_layer" in r:
            r["speedup_vs_xla"] = xla_ms / r["ms_per_layer"]

    result = {
        "device": device,
        "backend": backend,
        "dtype": dtype,
        "preset": args.preset,
        "mode": args.mode,
        "workload": {"query": w.query_tokens, "items": w.items, "item_tokens": w.item_tokens},
        "forwards": [len(f.tokens) for f in forwards],
        "block": block,
        "useful_gflop_per_layer": flop / 1e9,
        "peak_gflops": peak,
        "precision": precision,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    print(
        f"\n{args.preset} attention, one layer ({dtype}, {device}), {args.mode} mode, "
        f"Q={w.query_tokens} N={w.items} L={w.item_tokens}: forwards of "
        f"{', '.join(map(str, result['forwards']))} tokens in blocks of {block}; "
        f"{flop / 1e9:.2f} useful GFLOP; matmul peak {peak / 1e3:.1f} TFLOP/s"
        + (" (Pallas in interpret mode: not a speed figure)" if backend == "cpu" else "")
        + "\n"
    )
    print("| variant | ms | TFLOP/s | % of peak | vs xla | max diff | status |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r['ms_per_layer']:.3f}" if "ms_per_layer" in r else "-",
            f"{r['tflops']:.3g}" if "tflops" in r else "-",
            f"{r['pct_of_peak']:.0f}%" if "pct_of_peak" in r else "-",
            f"{r['speedup_vs_xla']:.2f}x" if "speedup_vs_xla" in r else "-",
            f"{r['max_diff']:.2g}" if "max_diff" in r else "-",
        ]
        print(f"| {r['variant']} | {' | '.join(cells)} | {r['status']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
