"""`mis-score`: offline scoring and demo checkpoints (no Ray needed), the engine benchmark and
the deployment validator.

mis-score make-checkpoint --preset qwen3-tiny --out /tmp/qwen3-tiny [--seed 0]
mis-score score --model-path /tmp/qwen3-tiny --mode prefix --input req.jsonl --output resp.jsonl
mis-score batch --model-path DIR --input rows.parquet --output scores.parquet   (Ray Data)
mis-score bench ...        (mis_score/bench.py)
mis-score validate --url http://127.0.0.1:8000 --model-path DIR   (mis_score/validate.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mis_score import batch, bench, validate
from mis_score.offline import (
    OfflineScorer,
    adapters_from_args,
    add_adapter_flag,
    add_engine_flags,
    engine_config,
)
from models.checkpoint import DTYPES, make_random_checkpoint
from models.config import PRESETS
from serve_app.config import LimitsArgs

log = logging.getLogger("mis-score")


def _cmd_score(args: argparse.Namespace) -> int:
    from models.engine import ScoringEngine  # JAX: only the commands that score load it

    adapters = adapters_from_args(args)
    config = engine_config(args)
    if adapters and args.max_adapters is None:  # every adapter resident
        config = config.model_copy(update={"max_adapters": len(adapters)})
    engine = ScoringEngine(args.model_path, config, adapters)
    scorer = OfflineScorer(engine, args.model_name or Path(args.model_path).name, args.max_items)
    lines = Path(args.input).read_text().splitlines()
    start = time.perf_counter()
    n_err = n_items = 0
    with open(args.output, "w") as out:
        for lineno, line in enumerate(lines, 1):
            result = scorer.score_line(line)
            if result.get("object") == "error":
                n_err += 1
                log.warning("line %d: %s", lineno, result["message"])
            else:
                n_items += len(result["scores"])
            out.write(json.dumps(result) + "\n")
    log.info(
        "scored %d lines (%d errors, %d items) in %.2fs -> %s",
        len(lines),
        n_err,
        n_items,
        time.perf_counter() - start,
        args.output,
    )
    return 0


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    out = make_random_checkpoint(
        args.preset,
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_mb * 2**20 if args.max_shard_mb else None,
    )
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mis-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a RANDOM-WEIGHT HF checkpoint")
    mk.add_argument("--preset", required=True, choices=sorted(PRESETS))
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    mk.add_argument(
        "--max-shard-mb",
        type=int,
        default=0,
        help="split into shards with an index file (0: one file)",
    )
    mk.set_defaults(func=_cmd_make_checkpoint)

    sc = sub.add_parser("score", help="score a JSONL file of /v1/score request bodies")
    sc.add_argument("--model-path", required=True)
    sc.add_argument("--model-name", default=None, help="name in responses (default: dir name)")
    add_engine_flags(sc)
    add_adapter_flag(sc)
    max_items = LimitsArgs.model_fields["max_items_per_request"].default
    sc.add_argument("--max-items", type=int, default=max_items, help="items per request")
    sc.add_argument("--input", required=True, help="JSONL: one request body per line")
    sc.add_argument("--output", required=True, help="JSONL: one response or error per line")
    sc.set_defaults(func=_cmd_score)
    batch.add_parser(sub)
    bench.add_parser(sub)
    validate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
