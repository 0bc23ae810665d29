"""`mis-score`: offline scoring and demo checkpoints, no Ray needed.

mis-score make-checkpoint --preset qwen3-tiny --out /tmp/qwen3-tiny [--seed 0]
mis-score score --model-path /tmp/qwen3-tiny --mode prefix --input req.jsonl --output resp.jsonl
mis-score bench ...        (loadtests/bench_engine.py)
mis-score validate --url http://127.0.0.1:8000 --model-path DIR   (loadtests/validate.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loadtests import bench_engine, validate
from models.checkpoint import DTYPES, make_random_checkpoint
from models.config import PRESETS
from models.engine import AttentionKernel, EngineConfig, MaskImpl, Mode, ScoringEngine
from models.inputs import ScoringInputError
from serve_app.schema import ScoreRequest, error_body, validation_message

log = logging.getLogger("mis-score")


def score_line(engine: ScoringEngine, line: str, model_name: str) -> dict[str, Any]:
    """One `/v1/score` body (JSON text) -> the response body or the error body."""
    try:
        body = json.loads(line)
    except json.JSONDecodeError as e:
        return error_body(f"body: invalid JSON ({e.msg} at column {e.colno})", 400)
    try:
        request = ScoreRequest.model_validate(body)
    except ValidationError as e:
        return error_body(validation_message(e), 400)
    if request.model is not None and request.model != model_name:
        return error_body(
            f"model: unknown model {request.model!r}; serving {model_name!r}", 404, "NotFoundError"
        )
    try:
        return engine.score_request(request, model_name).model_dump()
    except ScoringInputError as e:
        return error_body(str(e), 400)


def _cmd_score(args: argparse.Namespace) -> int:
    config = EngineConfig(
        mode=Mode(args.mode),
        mask_impl=MaskImpl(args.mask_impl),
        attention_impl=AttentionKernel(args.attention_impl),
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        tp_size=args.tp_size,
    )
    engine = ScoringEngine(args.model_path, config)
    model_name = args.model_name or Path(args.model_path).name
    lines = Path(args.input).read_text().splitlines()
    start = time.perf_counter()
    n_err = n_items = 0
    with open(args.output, "w") as out:
        for lineno, line in enumerate(lines, 1):
            result = score_line(engine, line, model_name)
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

    defaults = EngineConfig()
    sc = sub.add_parser("score", help="score a JSONL file of /v1/score request bodies")
    sc.add_argument("--model-path", required=True)
    sc.add_argument("--model-name", default=None, help="name in responses (default: dir name)")
    sc.add_argument("--mode", default=defaults.mode.value, choices=[m.value for m in Mode])
    sc.add_argument(
        "--mask-impl", default=defaults.mask_impl.value, choices=[m.value for m in MaskImpl]
    )
    sc.add_argument(
        "--attention-impl",
        default=defaults.attention_impl.value,
        choices=[k.value for k in AttentionKernel],
        help="segment attention in XLA ops or the Pallas ragged kernel (TPU/GPU; slow "
        "interpret mode on CPU)",
    )
    sc.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    sc.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="compute dtype (default: the checkpoint's)",
    )
    sc.add_argument(
        "--tp-size",
        type=int,
        default=defaults.tp_size,
        help="devices to split the model over (tensor parallel); on CPU simulate them with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N",
    )
    sc.add_argument("--input", required=True, help="JSONL: one request body per line")
    sc.add_argument("--output", required=True, help="JSONL: one response or error per line")
    sc.set_defaults(func=_cmd_score)
    bench_engine.add_parser(sub)  # the benchmark lives with the load tests
    validate.add_parser(sub)  # so does the deployment validator
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
