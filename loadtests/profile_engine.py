"""Where a prefix-mode request's time goes: a timing table of its parts, one run.

    python -m loadtests.profile_engine [--preset qwen3-bench-s] [--query-tokens 2000]
        [--items 500] [--item-tokens 20] [--chunk-size 64]

Times, on the workload's shapes and the model's own functions (weights passed as arguments,
not captured as constants): the query prefill (whole
model), and per chunk forward the attention, the dense projections + MLP of all layers, and
the LM head; then compares their sum with a measured request. Each part is jitted alone and
timed best-of-5, so the parts add up to a bit less than the fused forward.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.segment_attention import segment_attention
from loadtests.bench_engine import matmul_peak_gflops, useful_flops
from loadtests.workload import Workload
from models.buckets import ladder_bucket, pow2_bucket
from models.checkpoint import ensure_demo_checkpoint
from models.engine import MIN_HEAD_TOKENS, MIN_SLOTS, EngineConfig, ScoringEngine, slot_bucket
from models.qwen import label_logits_and_lse


def _best_ms(fn, *args, repeats: int = 5) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-bench-s")
    p.add_argument("--query-tokens", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--item-tokens", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args()
    w = Workload(args.query_tokens, args.items, args.item_tokens)
    engine = ScoringEngine(
        ensure_demo_checkpoint(args.preset), EngineConfig(chunk_size=args.chunk_size)
    )
    cfg, dt = engine.cfg, engine.dtype
    slots, width = pow2_bucket(min(args.chunk_size, w.items), MIN_SLOTS), slot_bucket(w.item_tokens)
    chunks = -(-w.items // args.chunk_size)
    t, prefix = slots * width, ladder_bucket(w.query_tokens, MIN_HEAD_TOKENS)
    rnd = lambda *shape: jax.random.normal(jax.random.key(len(shape)), shape, dt)  # noqa: E731
    kv, g, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q, k, pk = rnd(1, t, kv, g, hd), rnd(1, t, kv, hd), rnd(1, prefix, kv, hd)
    pos = np.full((1, t), w.query_tokens, np.int32)
    off = np.tile(np.where(np.arange(width) < w.item_tokens, np.arange(width), -1), slots)[None]
    plen = np.array([w.query_tokens], np.int32)

    def attention(q, k, pk):
        return segment_attention(
            q, k, k, pk, pk, pos, off, plen, head_len=0, num_slots=slots, slot_len=width
        )

    layer = jax.tree.map(lambda a: a[0], engine.params["layers"])
    x = rnd(t, cfg.hidden_size)

    def dense(x, layer):
        a = layer["self_attn"]
        qkv = [x @ a[f"{n}_proj"]["kernel"].reshape(cfg.hidden_size, -1) for n in "qkv"]
        o = qkv[0] @ a["o_proj"]["kernel"].reshape(-1, cfg.hidden_size)
        m = layer["mlp"]
        up = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
        return o + up @ m["down_proj"]["kernel"] + qkv[1].sum() + qkv[2].sum()

    head = engine.params.get("lm_head", engine.params["embed_tokens"]["embedding"])
    h = rnd(1, slots, cfg.hidden_size)
    labels = jnp.asarray([list(w.label_ids)], jnp.int32)
    per_chunk = {
        "attention (all layers)": cfg.num_layers * _best_ms(attention, q, k, pk),
        "projections + MLP (all layers)": cfg.num_layers * _best_ms(dense, x, layer),
        "LM head (log-sum-exp over vocab)": _best_ms(label_logits_and_lse, h, head, labels),
    }
    body = w.body(0)
    engine.score_ids(body["query"], body["items"], list(w.label_ids))  # compile
    prefill = float("inf")
    for seed in (1, 2, 3):
        query = w.body(seed)["query"]
        start = time.perf_counter()
        jax.block_until_ready(engine._prefill(query))
        prefill = min(prefill, (time.perf_counter() - start) * 1e3)
    body = w.body(4)
    start = time.perf_counter()
    engine.score_ids(body["query"], body["items"], list(w.label_ids))
    request_ms = (time.perf_counter() - start) * 1e3
    rows = [("query prefill (once per request)", prefill)]
    rows += [(f"{name} x {chunks} chunks", ms * chunks) for name, ms in per_chunk.items()]
    total = sum(ms for _, ms in rows)
    flops = useful_flops(cfg, w.query_tokens, w.items, w.item_tokens)
    peak = matmul_peak_gflops(engine.dtype_name)
    print(
        f"{args.preset}, Q={w.query_tokens} N={w.items} L={w.item_tokens}, chunk "
        f"{args.chunk_size} ({slots} slots x {width}), peak {peak:.0f} GFLOP/s\n"
    )
    print("| part | ms per request | share |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} | {100 * ms / total:.0f}% |")
    print(f"| sum of parts | {total:.0f} | |")
    print(f"| measured request | {request_ms:.0f} | |")
    print("\nuseful GFLOP: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in flops.items()))
    print(f"MFU of the measured request: {100 * flops['total'] / request_ms / 1e6 / peak:.1f}%")


if __name__ == "__main__":
    main()
