"""`mis-score validate`: what a rollout needs to know about a live deployment, as a pass/fail
table with thresholds; exit code 1 when a check fails.

    mis-score validate --url http://127.0.0.1:8000 --model-path DIR [--json OUT]

- isolation: one item changed (same length; longer) leaves every other item's scores as they
  were;
- equivalence: the multi-item answer equals the same items sent one per request;
- parity: the multi-item answer equals HF transformers PyTorch on DIR (the checkpoint the
  deployment serves), one `query + item` forward per item; skipped when torch is missing;
- speedup: one request of N items vs the same N items as N one-item requests, N = 8, 32, 128
  (after warm-up; the best of 5 multi-item requests vs one pass of one-item requests).

Requests are token ids drawn from the vocabulary of DIR's config.json, so the checks need no
tokenizer and cover any model the deployment serves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import requests

from mis_score.workload import NO, YES
from models.checkpoint import read_hf_config

LABELS = [YES, NO]
SPEEDUP_SIZES = (8, 32, 128)


class Client:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 600):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def score(self, query: list[int], items: list[list[int]]) -> np.ndarray:
        body = {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": True}
        resp = self.session.post(f"{self.url}/v1/score", json=body, timeout=self.timeout_s)
        if resp.status_code != 200:
            raise RuntimeError(f"/v1/score answered {resp.status_code}: {resp.text[:300]}")
        return np.asarray(resp.json()["scores"], dtype=np.float64)

    def timed(self, query: list[int], items: list[list[int]]) -> float:
        start = time.perf_counter()
        self.score(query, items)
        return time.perf_counter() - start


def _request(rng: np.random.Generator, vocab: int, n: int, q: int = 32, max_len: int = 20):
    query = rng.integers(0, vocab, q).tolist()
    items = [rng.integers(0, vocab, int(k)).tolist() for k in rng.integers(1, max_len + 1, n)]
    return query, items


def check_isolation(client: Client, rng, vocab: int) -> float:
    """Largest change of an unchanged item's scores when one item changes."""
    query, items = _request(rng, vocab, 12)
    base = client.score(query, items)
    k = 5
    worst = 0.0
    for changed in (
        rng.integers(0, vocab, len(items[k])).tolist(),  # same length
        items[k] + rng.integers(0, vocab, 9).tolist(),  # longer: the items after it move
    ):
        mutated = client.score(query, items[:k] + [changed] + items[k + 1 :])
        others = [i for i in range(len(items)) if i != k]
        worst = max(worst, float(np.abs(mutated[others] - base[others]).max()))
    return worst


def check_equivalence(client: Client, query, items, multi: np.ndarray) -> float:
    one_each = np.concatenate([client.score(query, [it]) for it in items])
    return float(np.abs(multi - one_each).max())


def check_parity(model_path: str, query, items, multi: np.ndarray, dtype: str) -> float | None:
    """Max abs diff vs transformers (None: torch is not installed)."""
    try:
        from mis_score.bench import HFScorer
    except ImportError:
        return None
    try:
        hf = HFScorer(model_path, dtype, batch=1)  # batch 1: no padding in the reference
    except ImportError:
        return None
    return float(np.abs(multi - hf.pairs(query, items, LABELS)).max())


def check_speedup(client: Client, rng, vocab: int, n: int) -> dict[str, float]:
    """Best of 5 multi-item requests vs N one-item requests in sequence. Both are warmed up
    first (3 multi-item requests, one pass of the one-item ones): each replica compiles a
    shape the first time it sees it, and a timed run must not include that."""
    query, items = _request(rng, vocab, n, q=128, max_len=20)
    for _ in range(3):
        client.score(query, items)
    for it in items:
        client.score(query, [it])
    multi = min(client.timed(query, items) for _ in range(5))
    single = sum(client.timed(query, [it]) for it in items)
    return {"multi_s": multi, "one_item_requests_s": single, "speedup": single / multi}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement against the live deployment (no verdicts yet)."""
    hf_config = read_hf_config(args.model_path)
    vocab = int(hf_config["vocab_size"])
    dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    client = Client(args.url, args.api_key)
    models = client.session.get(f"{client.url}/v1/models", timeout=60).json()
    rng = np.random.default_rng(args.seed)
    isolation = check_isolation(client, rng, vocab)
    query, items = _request(rng, vocab, 16)
    multi = client.score(query, items)
    return {
        "url": args.url,
        "model": models["data"][0]["id"] if models.get("data") else None,
        "model_path": args.model_path,
        "dtype": dtype,
        "isolation": isolation,
        "equivalence": check_equivalence(client, query, items, multi),
        "parity": check_parity(args.model_path, query, items, multi, dtype),
        "speedup": {n: check_speedup(client, rng, vocab, n) for n in SPEEDUP_SIZES},
    }


def judge(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Measurements + thresholds -> the pass/fail table (a missing measurement: skipped)."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, threshold: float, at_least: bool = False) -> None:
        if value is None:
            status = "skipped"
        else:
            status = "pass" if (value >= threshold if at_least else value <= threshold) else "FAIL"
        op = ">=" if at_least else "<="
        checks.append(
            {"check": name, "measured": value, "threshold": f"{op} {threshold:g}", "status": status}
        )

    parity_tol = args.parity_tol or (1e-4 if measured["dtype"] == "float32" else 2e-2)
    add("isolation: max change of other items' scores", measured["isolation"], args.isolation_tol)
    add("equivalence: multi-item vs one item per request", measured["equivalence"],
        args.equivalence_tol)  # fmt: skip
    add(f"parity vs HF transformers ({measured['dtype']})", measured["parity"], parity_tol)
    for n, floor in zip(SPEEDUP_SIZES, args.min_speedup, strict=True):
        add(f"speedup vs one-item requests, N={n}", measured["speedup"][n]["speedup"], floor, True)
    passed = all(c["status"] != "FAIL" for c in checks)
    return {**measured, "checks": checks, "passed": passed}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| check | measured | threshold | result |", "|---|---|---|---|"]
    for c in result["checks"]:
        measured = "-" if c["measured"] is None else f"{c['measured']:.3g}"
        lines.append(f"| {c['check']} | {measured} | {c['threshold']} | {c['status']} |")
    verdict = "PASSED" if result["passed"] else "FAILED"
    lines.append(f"\n{verdict}: {result['url']} ({result['model']})")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a live deployment: isolation, equivalence, parity, speedup (exit 1: failed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", required=True, help="base URL of the deployment")
    p.add_argument("--model-path", required=True, help="the checkpoint dir it serves")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--api-key", default=os.environ.get("MIS_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolation-tol", type=float, default=1e-6)
    p.add_argument("--equivalence-tol", type=float, default=1e-5)
    p.add_argument(
        "--parity-tol", type=float, default=None, help="default: 1e-4 float32, 2e-2 bfloat16"
    )
    p.add_argument(
        "--min-speedup",
        type=float,
        nargs=3,
        default=[1.5, 3.0, 5.0],
        metavar=("N8", "N32", "N128"),
        help="least speedup vs one-item requests at N = 8, 32, 128",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = judge(measure(args), args)
    except (requests.RequestException, RuntimeError) as e:
        print(f"validate: {args.url}: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["passed"] else 1
