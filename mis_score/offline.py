"""Score API request bodies scored by one engine in this process, as the service scores them:
the request checks and the scoring core of mis_api.scoring, shared by `mis-score score` and
`mis-score batch` (one actor each). No Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from mis_api.long_items import Windows
from mis_api.schema import ScoreRequest, error_body, validation_message
from mis_api.scoring import make_chunks, prepare_request, prompt_tokens, response_body
from models.engine_config import EngineConfig
from models.inputs import ScoringInputError
from models.tokenizer import TextTokenizer

if TYPE_CHECKING:  # the engine (JAX) is loaded by whoever builds one, not by the CLI's parser
    from models.engine import ScoringEngine

log = logging.getLogger("mis-score")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request that passed every check: its token ids, ready for the engine."""

    request: ScoreRequest
    query: list[int]
    items: list[list[int]]  # as scored: cut, suffixed, windows
    windows: Windows | None = None  # long_items chunk: which scored items are whose windows

    @property
    def n_tokens(self) -> int:
        return prompt_tokens(self.query, self.items)


class OfflineScorer:
    """`/v1/score` bodies scored by one engine in this process, as the service would."""

    def __init__(self, engine: ScoringEngine, model_name: str, max_items: int):
        self.engine, self.model_name, self.max_items = engine, model_name, max_items
        if model_name in engine.adapters():
            raise ValueError(f"--adapter: {model_name!r} is also the base model's name")
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
        return self.score_body(body)

    def score_body(self, body: Any) -> dict[str, Any]:
        """One request body (parsed JSON) -> the response body or the error body."""
        prepared = self.prepare(body)
        return prepared if isinstance(prepared, dict) else self.score([prepared])[0]

    def prepare(self, body: Any) -> Prepared | dict[str, Any]:
        """Every check the service makes of a request: the request ready for the engine, or
        the error body (naming the field)."""
        try:
            request = ScoreRequest.model_validate(body)
        except ValidationError as e:
            return error_body(validation_message(e), 400)
        adapters = list(self.engine.adapters())
        if request.model is not None and request.model not in [self.model_name, *adapters]:
            return error_body(
                f"model: unknown model {request.model!r}; serving {self.model_name!r}"
                + (f" and adapters {adapters}" if adapters else ""),
                404,
                "NotFoundError",
            )
        try:
            query, items, windows = prepare_request(
                request,
                self.tokenizer,
                vocab_size=self.engine.vocab_size,
                engine=self.engine.config,
                max_items=self.max_items,
                head=self.engine.head_of(self.adapter_of(request.model)),
            )
        except ScoringInputError as e:
            return error_body(str(e), 400)
        return Prepared(request, query, items, windows)

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter `model` names (None: the base, by any of its names)."""
        return model if model in self.engine.adapters() else None

    def score(self, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Checked requests -> their response bodies (or error bodies), in order, from one
        engine call: the engine packs the requests' items into shared forwards, and an item's
        scores do not depend on what else a forward holds (bit for bit)."""
        # One chunk of every item per request: the engine packs them into forwards itself.
        chunks = [
            make_chunks(
                p.request,
                p.query,
                p.items,
                len(p.items),
                p.n_tokens,
                self.adapter_of(p.request.model),
            )[0]
            for p in prepared
            if p.items
        ]
        results = iter(self.engine.score(chunks) if chunks else [])
        out = []
        for p in prepared:
            model = p.request.model or self.model_name  # as the service answers: the name asked
            if not p.items:
                width = len(p.request.label_token_ids) or len(
                    self.engine.classes(self.adapter_of(p.request.model))
                )
                out.append(response_body(np.zeros((0, width)), model, p.n_tokens))
                continue
            scores = next(results)
            if isinstance(scores, ScoringInputError):
                out.append(error_body(str(scores), 400))
            else:
                out.append(response_body(scores, model, p.n_tokens, p.windows))
        return out


def engine_config(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """The engine flags of `score`, `batch` and `bench` over `base` (a flag left out keeps
    base's value, by default EngineConfig's default)."""
    fields = ("mode", "attention", "dtype", "tp_size", "max_batch_tokens", "max_item_tokens",
              "max_query_tokens", "max_labels", "max_adapters", "max_lora_rank")  # fmt: skip
    flags = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    if base is None:
        return EngineConfig(**flags)
    return EngineConfig.model_validate(base.model_dump(exclude_unset=True) | flags)


def adapter_flag(value: str) -> tuple[str, str]:
    """`--adapter NAME=DIR`."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=DIR (peft's adapter directory)")
    return name, path


def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        type=adapter_flag,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter (peft's directory) a request picks with `model`: NAME; repeat for "
        "more (--max-adapters of them resident at once, default all)",
    )


def adapters_from_args(args: argparse.Namespace) -> dict[str, str]:
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("--adapter: a name given twice")
    return adapters


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
