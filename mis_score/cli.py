"""`mis-score`: offline scoring and demo checkpoints (no Ray needed), the engine benchmark and
the deployment validator.

mis-score make-checkpoint --preset qwen3-tiny --out /tmp/qwen3-tiny [--seed 0]
mis-score score --model-path /tmp/qwen3-tiny --mode prefix --input req.jsonl --output resp.jsonl
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
from typing import Any

import numpy as np
from pydantic import ValidationError

from mis_score import bench, validate
from models.checkpoint import DTYPES, make_random_checkpoint
from models.config import PRESETS
from models.engine import EngineConfig, ScoringEngine
from models.inputs import ScoringInputError
from models.tokenizer import TextTokenizer
from serve_app.config import LimitsArgs
from serve_app.schema import ScoreRequest, error_body, validation_message
from serve_app.scoring import (
    make_chunks,
    prepare_request,
    prompt_tokens,
    response_body,
)

log = logging.getLogger("mis-score")


class OfflineScorer:
    """`/v1/score` bodies scored by one engine in this process, as the service would."""

    def __init__(self, engine: ScoringEngine, model_name: str, max_items: int):
        self.engine, self.model_name, self.max_items = engine, model_name, max_items
        try:
            self.tokenizer: TextTokenizer | None = TextTokenizer.from_model_dir(engine.model_dir)
        except FileNotFoundError:
            log.warning("%s has no tokenizer.json: only token-id requests work", engine.model_dir)
            self.tokenizer = None

    def score_line(self, line: str) -> dict[str, Any]:
        """One request body (JSON text) -> the response body or the error body."""
        try:
            body = json.loads(line)
        except json.JSONDecodeError as e:
            return error_body(f"body: invalid JSON ({e.msg} at column {e.colno})", 400)
        try:
            request = ScoreRequest.model_validate(body)
        except ValidationError as e:
            return error_body(validation_message(e), 400)
        if request.model is not None and request.model != self.model_name:
            return error_body(
                f"model: unknown model {request.model!r}; serving {self.model_name!r}",
                404,
                "NotFoundError",
            )
        try:
            query, items = prepare_request(
                request,
                self.tokenizer,
                vocab_size=self.engine.vocab_size,
                engine=self.engine.config,
                max_items=self.max_items,
                head=(self.engine.head_kind, self.engine.class_labels),
            )
        except ScoringInputError as e:
            return error_body(str(e), 400)
        n_tokens = prompt_tokens(query, items)
        if not items:
            empty = np.zeros((0, len(request.label_token_ids) or len(self.engine.class_labels)))
            return response_body(empty, self.model_name, n_tokens)
        # One chunk of every item: the engine packs them into forwards itself.
        (chunk,) = make_chunks(request, query, items, len(items), n_tokens)
        (scores,) = self.engine.score([chunk])
        if isinstance(scores, ScoringInputError):
            return error_body(str(scores), 400)
        return response_body(scores, self.model_name, n_tokens)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine flags of `score` and `bench` (a flag left out keeps EngineConfig's default)."""
    fields = ("mode", "attention", "dtype", "tp_size", "max_batch_tokens", "max_item_tokens",
              "max_query_tokens", "max_labels")  # fmt: skip
    return EngineConfig(
        **{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    )


def add_engine_flags(p: argparse.ArgumentParser, modes: bool = True) -> None:
    """One flag per EngineConfig field, described by the field itself."""
    for name, field in EngineConfig.model_fields.items():
        if name == "prefix_pool_tokens" or (name == "mode" and not modes):
            continue
        kind = str if name in ("mode", "attention", "dtype") else int
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{field.description} (default: {getattr(field.default, 'value', field.default)})",
        )


def _cmd_score(args: argparse.Namespace) -> int:
    engine = ScoringEngine(args.model_path, engine_config(args))
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
    max_items = LimitsArgs.model_fields["max_items_per_request"].default
    sc.add_argument("--max-items", type=int, default=max_items, help="items per request")
    sc.add_argument("--input", required=True, help="JSONL: one request body per line")
    sc.add_argument("--output", required=True, help="JSONL: one response or error per line")
    sc.set_defaults(func=_cmd_score)
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
