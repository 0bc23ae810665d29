"""`mis-score bench`: the engine's scoring modes side by side, one run, one checkpoint.

For each mode (and chunk size: a request is scored as chunks of that many items, all handed to
the engine at once, as a replica receives them) it times requests of the workload (a new query
per request, after an untimed warm-up request that compiles the shapes), checks the warm-up
request's scores first against a reference that cannot share the mode's rounding (transformers
in float64 on the same checkpoint; a mode off by more than the float32 equivalence bound is
reported as failed and not ranked), and reports items/s, p50/p95 latency and MFU: useful
FLOPs (DESIGN.md section 5) per second over the dense matmul peak measured in the same run
(large products back to back, best of several; an MFU over 100% means the peak is wrong, and
the bench stops). The `transformers` rows score the same items the ways a user would with HF
transformers PyTorch on the same checkpoint: batched `query+item` pairs, and the query's KV
cache reused over item batches.

Serial scoring and the transformers rows cost a full query forward per item, so they are timed
on a sample of the items (`--baseline-items`); items/s is a rate, so the sample gives it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mis_score.workload import AnyWorkload, RagWorkload, Workload
from models.checkpoint import ensure_demo_checkpoint
from models.config import PRESETS, ModelConfig
from models.engine_config import EngineConfig
from models.inputs import Chunk

log = logging.getLogger("mis-score.bench")

# mode name -> engine settings
MODES: dict[str, dict[str, str]] = {
    "serial": {"mode": "serial"},
    "packed-dense": {"mode": "packed", "attention": "dense"},
    "packed-segment": {"mode": "packed"},
    "prefix": {"mode": "prefix"},
}
# Gate bounds on each mode's scores (softmax over the labels) against the exact scores: the
# float32 equivalence bound, and the bf16-vs-f32 parity bound for bfloat16. The exact scores
# are transformers' in float64 (gate_reference). Two float32 computations may differ by twice
# the bound (each within it of the exact scores): comparing a mode with serial, as the gate once
# did, failed a correct packed-dense at 1.38e-5 on an Intel host where every mode was within
# 2.6e-6 of float64. Where serial scoring itself is further from float64 than the bound (long
# prompts: float32 error grows with length; serial was 1.5e-5 off on the RAG workload), the
# bound is SERIAL_ERROR_SCALE times serial's own error: a mode fails only when it is clearly
# worse than the plainest float32 computation of the same prompts.
GATE_BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
SERIAL_ERROR_SCALE = 3.0


def useful_flops(cfg: ModelConfig, query: int, item_tokens: Sequence[int]) -> dict[str, float]:
    """FLOPs that scoring items of `item_tokens` tokens each against one query of `query`
    tokens needs at the least (DESIGN.md 5): every token through the non-embedding weights
    once, attention over the visible keys only, the LM head at the score positions only."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = (
        d * cfg.num_heads * hd * 2  # q, o
        + d * cfg.num_kv_heads * hd * 2  # k, v
        + 3 * d * cfg.intermediate_size
    )
    lengths = np.asarray(item_tokens, np.float64)
    tokens = query + lengths.sum()
    visible = query * (query + 1) / 2 + (lengths * query + lengths * (lengths + 1) / 2).sum()
    dense = 2.0 * per_layer * cfg.num_layers * tokens
    attention = 4.0 * cfg.num_layers * cfg.num_heads * hd * visible
    lm_head = 2.0 * d * cfg.vocab_size * len(lengths)
    return {
        "dense": dense,
        "attention": attention,
        "lm_head": lm_head,
        "total": dense + attention + lm_head,
    }


# What a benchmark's times are read from. `wall`: elapsed time (what a user waits; needs a quiet
# machine). `process`: CPU seconds of this process, all its threads (the CPU backend's work,
# whatever else the machine runs: on a shared 2-core host other processes stretch wall times
# several-fold but not the CPU time a program needs; a peak read the same way is then GFLOP
# per CPU-second, and an MFU against it is how well the busy cores are used).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def matmul_peak_gflops(
    dtype: str, n: int | None = None, repeats: int = 5, clock: str = "wall"
) -> float:
    """Dense matmul GFLOP/s of this process's JAX backend in `dtype`: `k` [n, n] @ [n, n]
    products back to back in one program (one product timed alone is mostly launch overhead
    on a GPU: 2048^3 read ~150 TFLOP/s on an H100 whose peak is ~780), best of `repeats`, by
    `clock` (CLOCKS)."""
    import jax  # here and in run(): `mis-score --help` and the other commands load no JAX
    import jax.numpy as jnp

    gpu = jax.default_backend() != "cpu"
    n = n or (8192 if gpu else 2048)
    k = 8 if gpu else 2
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))

    @jax.jit
    def products(x, y):
        def step(i, acc):
            return acc + (x * (i + 1).astype(x.dtype)) @ y  # distinct products, one chain

        return jax.lax.fori_loop(0, k, step, jnp.zeros_like(x))

    products(a, a).block_until_ready()
    now, best = CLOCKS[clock], float("inf")
    for _ in range(repeats):
        start = now()
        products(a, a).block_until_ready()
        best = min(best, now() - start)
    return 2 * k * n**3 / best / 1e9


@dataclasses.dataclass
class Row:
    mode: str
    chunk_size: int | None
    items_timed: int
    items_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    mfu: float | None = None
    gate_max_diff: float | None = None
    status: str = "ok"  # ok | failed (gate) | skipped (reason)
    adapter_bytes: int | None = None  # device memory per adapter (adapter rows)


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def request_flops(cfg: ModelConfig, body: dict[str, Any], n_items: int) -> float:
    """Useful FLOPs of scoring the first `n_items` items of a request body."""
    lengths = [len(item) for item in body["items"][:n_items]]
    return useful_flops(cfg, len(body["query"]), lengths)["total"]


def _timed_requests(
    score, workload: AnyWorkload, n_items: int, repeats: int, cfg: ModelConfig
) -> list[tuple[float, float]]:
    """(seconds, useful FLOPs) of each timed request: a new query and new items each (their
    lengths vary in a RAG workload)."""
    timed = []
    for seed in range(1, repeats + 1):
        b = workload.body(seed)
        start = time.perf_counter()
        score(b["query"], b["items"][:n_items])
        timed.append((time.perf_counter() - start, request_flops(cfg, b, n_items)))
    return timed


def _finish_row(row: Row, timed: list[tuple[float, float]], peak: float) -> Row:
    times = [t for t, _ in timed]
    mean = statistics.fmean(times)
    row.items_per_s = row.items_timed / mean
    row.p50_ms = _percentile(times, 50) * 1e3
    row.p95_ms = _percentile(times, 95) * 1e3
    gflops = sum(f for _, f in timed) / sum(times) / 1e9
    row.mfu = share_of_peak(gflops, peak, f"{row.mode}: MFU")
    return row


def share_of_peak(gflops: float, peak: float, what: str) -> float:
    """Useful `gflops` per second over the measured matmul `peak`. Over 1 the peak cannot be
    right (more useful work than the chip's matmul rate): raise rather than print it."""
    share = gflops / peak
    if share > 1:
        raise RuntimeError(
            f"{what} {share:.0%} against a measured peak of {peak:.1f} GFLOP/s: the peak "
            "cannot be right (more useful work than the chip's matmul rate)"
        )
    return share


def hf_scores(
    model, query: list[int], items: list[list[int]], labels: list[int], *, item_first=False
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' scores of each item on its own: (softmax over the label logits, full-vocab
    log-probs of the labels) [items, labels], float64 numpy. A float64 model runs the query
    once and each item from a copy of its K/V cache (transformers' own decoding path; 1e-14
    from whole forwards, 30x faster at 2000 query tokens); a float32 one runs every prompt
    whole, as serial scoring does. Only the last position's logits are computed
    (logits_to_keep=1, as `generate` does)."""
    import copy

    import torch

    cached = model.dtype == torch.float64 and not item_first
    soft, logp = [], []
    with torch.no_grad():
        if cached:
            _, past = hf_forward(
                model, input_ids=torch.tensor([query]), use_cache=True, logits_to_keep=1
            )
        for it in items:
            if cached:
                ids = torch.tensor([it])
                out, _ = hf_forward(model, copy.deepcopy(past), input_ids=ids, logits_to_keep=1)
            else:
                ids = torch.tensor([list(it) + query if item_first else query + list(it)])
                out = model(input_ids=ids, logits_to_keep=1)
            logits = out.logits[0, -1].double()
            soft.append(torch.softmax(logits[labels], -1).numpy())
            logp.append(torch.log_softmax(logits, -1)[labels].numpy())
    return np.array(soft), np.array(logp)


def gate_reference(
    model_dir: str, query: list[int], items: list[list[int]], labels: list[int]
) -> np.ndarray | None:
    """The exact scores the gate measures every mode against: transformers in float64 on the
    same checkpoint; None without PyTorch (the bench's dev extra)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return hf_scores(model, query, items, labels)[0]


def hf_forward(model, cache=None, **inputs) -> tuple[Any, Any]:
    """(output, its K/V cache) of a transformers causal LM, `cache` continued if given:
    transformers 5.25 renamed `past_key_values` (the argument and the output field) to `cache`
    and drops the old name in 5.40, while the releases before 5.25 know only the old one."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    if cache is not None:
        inputs[name] = cache
    out = model(**inputs)
    return out, getattr(out, name, None)


class HFScorer:
    """Scores the workload with HF transformers PyTorch, the ways a user would."""

    def __init__(self, model_dir: str, dtype: str, batch: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.batch = batch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        ).eval()

    def _label_softmax(self, logits, labels) -> np.ndarray:
        return self.torch.softmax(logits[:, labels].float(), dim=-1).numpy().astype(np.float64)

    @staticmethod
    def _by_length(items: list[list[int]], score_sorted) -> np.ndarray:
        """Scores items in batches of similar lengths (the least padding), in their order."""
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        scores = score_sorted([items[i] for i in order])
        out = np.empty_like(scores)
        out[order] = scores
        return out

    def pairs(self, query: list[int], items: list[list[int]], labels: list[int]) -> np.ndarray:
        """Length-sorted batches of left-padded `query + item` rows, logits of the last
        position only."""
        return self._by_length(items, lambda it: self._pairs(query, it, labels))

    def _pairs(self, query: list[int], items: list[list[int]], labels: list[int]) -> np.ndarray:
        torch, out = self.torch, []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch):
                rows = [query + it for it in items[start : start + self.batch]]
                width = max(map(len, rows))
                ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
                out.append(self._label_softmax(logits[:, -1], labels))
        return np.concatenate(out)

    def kv_reuse(self, query: list[int], items: list[list[int]], labels: list[int]) -> np.ndarray:
        """Prefill the query once; each length-sorted item batch runs on a copy of its cache
        (right-padded items, the cache cropped back to the query after each batch)."""
        return self._by_length(items, lambda it: self._kv_reuse(query, it, labels))

    def _kv_reuse(self, query: list[int], items: list[list[int]], labels: list[int]):
        torch, out, q = self.torch, [], len(query)
        with torch.inference_mode():
            _, cache = hf_forward(self.model, input_ids=torch.tensor([query]), use_cache=True)
            cache.batch_repeat_interleave(self.batch)
            for start in range(0, len(items), self.batch):
                group = items[start : start + self.batch]
                rows = group + group[:1] * (self.batch - len(group))  # fixed batch: pad rows
                width = max(map(len, rows))
                ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
                mask = torch.tensor([[1] * q + [1] * len(r) + [0] * (width - len(r)) for r in rows])
                step, _ = hf_forward(
                    self.model, cache, input_ids=ids, attention_mask=mask, use_cache=True
                )
                logits = step.logits
                cache.crop(-width)  # drop the items, keep the query
                last = torch.tensor([len(r) - 1 for r in rows])
                picked = logits[torch.arange(len(rows)), last][: len(group)]
                out.append(self._label_softmax(picked, labels))
        return np.concatenate(out)


def bench_engine_config(args: argparse.Namespace, workload: AnyWorkload, name: str) -> EngineConfig:
    """The engine of mode `name`, sized for the workload."""
    settings: dict[str, Any] = {"attention": args.attention, **MODES[name]}
    return EngineConfig(
        dtype=args.dtype,
        max_batch_tokens=args.max_batch_tokens,
        max_item_tokens=workload.item_tokens,
        max_query_tokens=workload.query_tokens,
        max_labels=len(workload.label_ids),
        **settings,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from models.engine import ScoringEngine

    model_dir = args.model_path or str(ensure_demo_checkpoint(args.preset))
    workload = make_workload(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")
    # One engine per mode (compiled programs are shared between equal ones); serial is the gate.
    engines = {
        name: ScoringEngine(model_dir, bench_engine_config(args, workload, name))
        for name in dict.fromkeys(["serial", *modes])
    }
    cfg, dtype = engines["serial"].cfg, engines["serial"].dtype_name
    peak = matmul_peak_gflops(dtype)
    log.info("dense matmul peak (%s): %.1f GFLOP/s", dtype, peak)
    default_baseline = workload.items if isinstance(workload, RagWorkload) else 16
    baseline_n = min(args.baseline_items or default_baseline, workload.items)
    labels = list(workload.label_ids)
    gate_body = workload.body(0)
    flops_full = useful_flops(cfg, len(gate_body["query"]), list(map(len, gate_body["items"])))
    gate_query, gate_items = gate_body["query"], gate_body["items"][:baseline_n]
    bound = GATE_BOUND.get(dtype, GATE_BOUND["bfloat16"])

    def scorer(name: str, chunk: int | None):
        engine = engines[name]

        def score(query: list[int], items: list[list[int]]) -> np.ndarray:
            size = chunk or len(items)
            chunks = [
                Chunk(tuple(query), tuple(map(tuple, items[i : i + size])), tuple(labels), True)
                for i in range(0, len(items), size)
            ]
            return np.concatenate(engine.score(chunks))

        return score

    serial = scorer("serial", None)(gate_query, gate_items)
    exact = gate_reference(model_dir, gate_query, gate_items, labels)
    if exact is None:  # no PyTorch: serial stands in; two float32 results: twice the bound
        gate = Gate(serial, 2 * bound, "serial (float32; no PyTorch for a float64 reference)")
    else:
        bound = max(bound, SERIAL_ERROR_SCALE * float(np.abs(serial - exact).max()))
        gate = Gate(exact, bound, "transformers float64")
    log.info("gate: every mode within %.3g of %s", gate.bound, gate.against)
    plan = [("serial", None)] if "serial" in modes else []
    plan += [(m, c) for m in modes if m != "serial" for c in args.chunk_sizes]
    rows: list[Row] = []
    for name, chunk in tqdm(plan, desc="bench", unit="run", file=sys.stderr):
        score = scorer(name, chunk)
        n = baseline_n if name == "serial" else workload.items
        row = Row(name, chunk, n)
        budget = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need = _dense_bytes(cfg, args.max_batch_tokens)
        if name == "packed-dense" and need > budget:
            row.status = f"skipped (dense mask forward needs ~{need / 2**30:.0f} GiB)"
            rows.append(row)
            continue
        try:
            # Compiles, then gates (serial's warm-up request is the gate request itself).
            warm = serial if name == "serial" else score(gate_query, gate_body["items"][:n])
            row.gate_max_diff = float(np.abs(warm[:baseline_n] - gate.scores).max())
            if not row.gate_max_diff <= gate.bound:
                row.status = (
                    f"failed (scores differ from {gate.against} by {row.gate_max_diff:.3g})"
                )
                rows.append(row)
                continue
            timed = _timed_requests(score, workload, n, args.repeats, cfg)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            row.status = "skipped (out of memory)"
            rows.append(row)
            continue
        rows.append(_finish_row(row, timed, peak))
    if args.adapters:
        rows += _adapter_rows(args, model_dir, workload, cfg, gate, peak)
    hf_rows = _transformers_rows(args, model_dir, cfg, dtype, workload, labels, gate, peak)
    result = _report(args, workload, cfg, dtype, peak, flops_full, rows, hf_rows, model_dir)
    result["gate"] = {"against": gate.against, "bound": gate.bound}
    return result


def _adapter_rows(args, model_dir: str, workload: AnyWorkload, cfg, gate: Gate, peak: float):
    """Prefix mode with `--adapters` random-weight LoRA adapters of rank `--lora-rank` on the
    device: requests for the base only (gated as every mode: the LoRA term must add exact
    zeros), and requests whose chunks cycle over the adapters and the base (checked bit for bit
    against the same engine scoring each chunk alone). MFU counts the base model's FLOPs."""
    import tempfile

    from models.adapters import write_random_adapter
    from models.engine import ScoringEngine

    root = Path(tempfile.mkdtemp(prefix="mis-bench-adapters-"))
    names = [f"adapter-{i}" for i in range(args.adapters)]
    paths = {
        n: str(write_random_adapter(cfg, root / n, rank=args.lora_rank, seed=i))
        for i, n in enumerate(names)
    }
    config = bench_engine_config(args, workload, "prefix").model_copy(
        update={"max_adapters": args.adapters, "max_lora_rank": args.lora_rank}
    )
    engine = ScoringEngine(model_dir, config, paths)
    labels = list(workload.label_ids)
    slot_bytes = (
        cfg.num_layers
        * args.lora_rank
        * engine.dtype.itemsize
        * sum(
            a.shape[2] + b.shape[3]
            for a, b in engine._lora.values()  # noqa: SLF001
        )
    )
    log.info("adapters: %d of rank %d, %.1f MiB of device memory each", args.adapters,
             args.lora_rank, slot_bytes / 2**20)  # fmt: skip

    def chunks_of(query, items, chunk: int, mixed: bool) -> list[Chunk]:
        cycle = [None, *names] if mixed else [None]
        return [
            Chunk(
                tuple(query),
                tuple(map(tuple, items[i : i + chunk])),
                tuple(labels),
                True,
                adapter=cycle[(i // chunk) % len(cycle)],
            )
            for i in range(0, len(items), chunk)
        ]

    rows = []
    body = workload.body(0)
    for chunk in args.chunk_sizes:
        for mixed in (False, True):
            what = "mixed" if mixed else "base only"
            row = Row(f"prefix + {args.adapters} adapters, {what}", chunk, workload.items)
            row.adapter_bytes = slot_bytes

            def score(query, items, chunk=chunk, mixed=mixed):
                return np.concatenate(engine.score(chunks_of(query, items, chunk, mixed)))

            warm = score(body["query"], body["items"])
            if mixed:
                parts = chunks_of(body["query"], body["items"], chunk, True)
                alone = np.concatenate([engine.score([c])[0] for c in parts])
                row.gate_max_diff = float(np.abs(warm - alone).max())
                ok = row.gate_max_diff == 0.0
                against = "each chunk scored alone"
            else:
                row.gate_max_diff = float(np.abs(warm[: len(gate.scores)] - gate.scores).max())
                ok = row.gate_max_diff <= gate.bound
                against = gate.against
            if not ok:
                row.status = f"failed (scores differ from {against} by {row.gate_max_diff:.3g})"
                rows.append(row)
                continue
            timed = _timed_requests(score, workload, workload.items, args.repeats, cfg)
            rows.append(_finish_row(row, timed, peak))
    return rows


@dataclasses.dataclass(frozen=True)
class Gate:
    """What every mode's scores of the gate request are checked against, and how closely."""

    scores: np.ndarray  # [baseline items, labels]
    bound: float
    against: str


def _transformers_rows(args, model_dir, cfg, dtype, workload, labels, gate: Gate, peak):
    """Pairs are timed on the baseline sample (each item costs a full forward); KV reuse on
    all items, since its query prefill is shared by the whole request."""
    if args.no_transformers:
        return []
    n_pairs = len(gate.scores)
    try:
        hf = HFScorer(model_dir, dtype, args.hf_batch)
    except ImportError as e:
        return [
            Row(f"transformers {way}", None, n_pairs, status=f"skipped ({e})")
            for way in ("pairs", "kv-reuse")
        ]
    request = workload.body(0)
    rows = []
    for way, fn, n in (("pairs", hf.pairs, n_pairs), ("kv-reuse", hf.kv_reuse, workload.items)):
        row = Row(f"transformers {way}", args.hf_batch, n)
        got = fn(request["query"], request["items"][:n_pairs], labels)
        row.gate_max_diff = float(np.abs(got - gate.scores).max())
        # The tests' parity bound (HF's own batching, padding and SDPA kernels differ).
        if not row.gate_max_diff <= max(gate.bound, 1e-4):
            row.status = f"failed (differs from {gate.against} by {row.gate_max_diff:.3g})"
        timed = _timed_requests(
            lambda q, items, fn=fn: fn(q, items, labels), workload, n, args.repeats, cfg
        )
        rows.append(_finish_row(row, timed, peak))
    return rows


def _dense_bytes(cfg: ModelConfig, tokens: int) -> float:
    """Rough peak memory of one packed-dense forward of `tokens` tokens: three [heads, T, T]
    float32 arrays live at once (scores, masked scores, their exp) and the bool mask. Measured:
    a 14,048-token stream of qwen3-bench-s peaked at 20.7 GB; this says 19.1 GB."""
    return cfg.num_heads * tokens * tokens * 4 * 3 + tokens * tokens


def _best(rows: list[Row], names: tuple[str, ...]) -> Row | None:
    ok = [r for r in rows if r.status == "ok" and r.mode.startswith(names)]
    return max(ok, key=lambda r: r.items_per_s or 0.0, default=None)


def _ratios(rows: list[Row], hf_rows: list[Row], workload: AnyWorkload) -> dict[str, Any]:
    rows = [r for r in rows if r.adapter_bytes is None]  # the modes alone
    best = _best(rows, ("packed", "prefix"))
    serial = _best(rows, ("serial",))
    hf = _best(hf_rows, ("transformers",))
    full = [r for r in rows if r.status == "ok" and (r.chunk_size or 0) >= workload.items]
    seg = _best(full, ("packed-segment",))
    dense = _best(full, ("packed-dense",))

    def ratio(a: Row | None, b: Row | None) -> float | None:
        return a.items_per_s / b.items_per_s if a and b else None

    return {
        "best_mode": f"{best.mode} chunk {best.chunk_size}" if best else None,
        "best_vs_serial": ratio(best, serial),
        "segment_vs_dense_one_chunk": ratio(seg, dense),
        "best_vs_best_transformers": ratio(best, hf),
        "best_mfu": best.mfu if best else None,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']['name']} ({result['model']['dtype']}), "
        f"{result['workload_described']}, matmul peak {result['peak_gflops']:.1f} GFLOP/s "
        f"({result['cpu_model'] or result['jax_backend']}), "
        f"useful work {result['useful_gflop_per_request']:.1f} GFLOP/request",
        "",
        "| mode | chunk | items timed | items/s | p50 ms | p95 ms | MFU | vs serial "
        "| gate max diff | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    serial = next((r for r in result["rows"] if r["mode"] == "serial" and r["items_per_s"]), None)
    for r in result["rows"] + result["transformers"]:
        vs = r["items_per_s"] / serial["items_per_s"] if serial and r["items_per_s"] else None
        lines.append(
            f"| {r['mode']} | {r['chunk_size'] or '-'} | {r['items_timed']} | "
            f"{_fmt(r['items_per_s'], '.2f')} | {_fmt(r['p50_ms'], '.0f')} | "
            f"{_fmt(r['p95_ms'], '.0f')} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | "
            f"{_fmt(vs, '.1f')}x | {_fmt(r['gate_max_diff'], '.2g')} | {r['status']} |"
        )
    ra = result["ratios"]
    lines += [
        "",
        f"best: {ra['best_mode']}; vs serial {_fmt(ra['best_vs_serial'], '.1f')}x; "
        f"segment vs dense (one chunk) {_fmt(ra['segment_vs_dense_one_chunk'], '.2f')}x; "
        f"vs best transformers {_fmt(ra['best_vs_best_transformers'], '.1f')}x; "
        f"MFU {_fmt(ra['best_mfu'] and 100 * ra['best_mfu'], '.1f')}% of the measured "
        f"{result['peak_gflops']:.1f} GFLOP/s matmul peak",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], out: str) -> None:
    """items/s against chunk size per multi-item mode; serial and transformers as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_mode: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if r["chunk_size"] and r["items_per_s"]:
            by_mode.setdefault(r["mode"], []).append((r["chunk_size"], r["items_per_s"]))
    for mode, pts in by_mode.items():
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", label=mode)
    flat = [
        r
        for r in result["rows"] + result["transformers"]
        if r["items_per_s"] and (not r["chunk_size"] or r["mode"].startswith("transformers"))
    ]
    for i, r in enumerate(flat):
        color = plt.cm.Dark2(i)
        ax.axhline(r["items_per_s"], linestyle="--", linewidth=1, label=r["mode"], color=color)
    ax.set(
        xscale="log",
        xticks=sorted({c for pts in by_mode.values() for c, _ in pts}),
        yscale="log",
        xlabel="chunk size (items per stream)",
        ylabel="items/s",
        title=f"{result['model']['name']}: {result['workload_described']}",
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def cpu_model() -> str | None:
    """The host CPU's model name (Linux), to say which CPU a figure comes from."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    names = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
    ]
    return names[0] if names else None


def make_workload(args: argparse.Namespace) -> AnyWorkload:
    if args.workload == "rag":
        return RagWorkload(items=args.items or RagWorkload.items)
    items = args.items or Workload.items
    return Workload(args.query_tokens, items, args.item_tokens, tuple(args.labels))


def _jax_backend() -> str:
    import jax

    return jax.default_backend()


def _report(args, workload, cfg, dtype, peak, flops, rows, hf_rows, model_dir) -> dict[str, Any]:
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "model": {
            "name": Path(model_dir).name,
            "path": model_dir,
            "dtype": dtype,
            "attention": args.attention,
        },
        "workload": {"kind": args.workload, **dataclasses.asdict(workload)},
        "workload_described": workload.describe(),
        "peak_gflops": peak,
        "useful_gflop_per_request": flops["total"] / 1e9,
        "useful_gflop_breakdown": {k: v / 1e9 for k, v in flops.items()},
        "rows": [dataclasses.asdict(r) for r in rows],
        "transformers": [dataclasses.asdict(r) for r in hf_rows],
        "ratios": _ratios(rows, hf_rows, workload),
        "jax_backend": _jax_backend(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the scoring modes side by side (JSON + table)")
    p.add_argument(
        "--preset",
        default="qwen3-bench-s",
        choices=sorted(PRESETS),
        help="random-weight demo checkpoint to generate/use when --model-path is unset",
    )
    p.add_argument("--model-path", default=None)
    p.add_argument(
        "--workload",
        default="fixed",
        choices=["fixed", "rag"],
        help="fixed: one query of --query-tokens, --items items of --item-tokens each (default: "
        "the reference workload); rag: Qwen3-Reranker's prompt, a 10-40-word query, --items "
        "documents (default 100) of 50-1,000 tokens, long-tailed (mis_score/workload.py)",
    )
    p.add_argument("--query-tokens", type=int, default=Workload.query_tokens)
    p.add_argument("--items", type=int, default=None, help=f"default {Workload.items} (fixed)")
    p.add_argument("--item-tokens", type=int, default=Workload.item_tokens)
    p.add_argument("--labels", type=int, nargs="+", default=list(Workload().label_ids))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--repeats", type=int, default=3, help="timed requests per run")
    p.add_argument(
        "--baseline-items",
        type=int,
        default=None,
        help="items timed for serial and transformers' pairs (a full query forward each; "
        "default 16 of a fixed workload, every document of a RAG one: their lengths vary)",
    )
    p.add_argument("--hf-batch", type=int, default=8, help="transformers batch size")
    p.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="also time prefix mode with this many random-weight LoRA adapters resident: "
        "base-only requests, and requests whose chunks cycle over the adapters and the base",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="the adapters' rank (--adapters)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "pallas"],
        help="attention of every mode but packed-dense (which is the dense baseline)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=EngineConfig.model_fields["max_batch_tokens"].default,
        help="tokens per forward (the engine packs a request's chunks into forwards of this)",
    )
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--plot", default=None, help="draw items/s per mode and chunk size (PNG)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        log.info("wrote %s", args.json)
    if args.plot:
        plot(result, args.plot)
        log.info("wrote %s", args.plot)
    # A mode whose scores disagree with serial scoring fails the run (a skipped one does not).
    return int(any(r["status"].startswith("failed") for r in result["rows"]))
