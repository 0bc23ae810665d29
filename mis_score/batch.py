"""`mis-score batch`: Score API requests from files to files on Ray Data, with the service's
request checks and scoring core (mis_score.offline.OfflineScorer) in an actor pool of engines.

    read (JSONL lines / Parquet rows)  ->  map_batches(_EngineActor, actor pool)  ->  the driver
    writes one output file, in input order, to `<output>.partial-<id>`, renamed when complete

Two row layouts, told apart per row: a Score API request (`query`, `items`, `label_token_ids`,
...) or one pair (`query`, `item`, ...), the pairs of a batch with the same query scored as one
request (one prefill per engine: its K/V stay in the engine's prefix pool). Every other column
is kept. Each output row is its input row plus `scores` (the response's scores; a pair's own
score list) or `error` (the error body's message, naming the field).

Idempotent, not resumable: a job that dies leaves no output file (only its `.partial-*`, removed
by the next run), and a rerun writes a complete new output. A dead engine actor is restarted by
Ray and its batches retried (Ray Data's actor pool: max_restarts and max_task_retries -1); the
driver writes each batch it receives once, so no row is lost and none is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mis_score.offline import OfflineScorer, Prepared, add_engine_flags, engine_config
from models.checkpoint import cache_root, demo_checkpoint_dir, ensure_demo_checkpoint
from models.engine_config import EngineConfig
from serve_app.config import AppArgs, LimitsArgs, ModelArgs
from serve_app.schema import ScoreRequest

log = logging.getLogger("mis-score")

REQUEST_FIELDS = tuple(ScoreRequest.model_fields)  # query, items, label_token_ids, ...
# Columns the job adds (an input that has them, e.g. an earlier output, gets them replaced).
OUTPUT_COLUMNS = ("scores", "error")
# Per-row bookkeeping from the actors to the driver (counted, never written).
# `__mis_engine`: the engine's counters after the batch (JSON, on the batch's first row): only
# batches that reach the driver count, so a retried batch is counted once.
_LINE, _ITEMS, _FAILED, _ENGINE = "__mis_line", "__mis_items", "__mis_failed", "__mis_engine"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolArgs(_Group):
    """The engines' actor pool."""

    num_engines: int | None = Field(
        default=None,
        ge=1,
        description="Engine actors. Default: as many as the cluster's resources hold at the "
        "per-engine amounts below, and with CPU engines one per node (XLA's CPU backend "
        "uses every core of its host), one CPU left for reading.",
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per engine actor.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per engine actor.")
    resources: dict[str, float] = Field(
        default={}, description='Other resources per engine actor, e.g. {"TPU": 4} (a TPU host).'
    )
    batch_rows: int = Field(
        default=64,
        ge=1,
        description="Rows per engine call: the unit of progress and of a retry after a failure.",
    )


class RowDefaults(_Group):
    """Request fields a row lacks (or holds null) take these (a pair file rarely repeats its
    label ids on every row)."""

    label_token_ids: list[int] | None = None
    apply_softmax: bool | None = None
    item_first: bool | None = None


class BatchSettings(_Group):
    """What a batch job runs with: the service's settings groups plus the pool's."""

    model: ModelArgs = ModelArgs()
    engine: EngineConfig = EngineConfig()
    max_items_per_request: int = LimitsArgs.model_fields["max_items_per_request"].default
    pool: PoolArgs = PoolArgs()
    defaults: RowDefaults = RowDefaults()

    @classmethod
    def from_serve_config(cls, path: str | Path, app: str | None = None) -> BatchSettings:
        """The model, engine and limits of an application in a Serve config file (its
        `args:`, as `serve run` gives them to build_app)."""
        raw = yaml.safe_load(Path(path).read_text())
        apps = raw.get("applications", [])
        chosen = [a for a in apps if app is None or a.get("name") == app]
        if len(chosen) != 1:
            names = [a.get("name") for a in apps]
            raise ValueError(f"{path}: name one of the applications {names} (--app)")
        args = AppArgs.parse(chosen[0].get("args") or {})
        return cls(
            model=args.model,
            engine=args.engine,
            max_items_per_request=args.limits.max_items_per_request,
        )

    def model_name(self) -> str:
        if self.model.name:
            return self.model.name
        return Path(self.model.path or demo_checkpoint_dir(self.model.demo_preset)).name


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    output: str
    rows: int
    items: int
    errors: int
    seconds: float  # the whole job: start, warm-up, scoring, writing
    scoring_seconds: float  # from the first engine ready to the last row written
    engines: list[dict[str, Any]]  # per engine process that scored: node, warm-up, counters

    @property
    def items_per_s(self) -> float:
        return self.items / self.scoring_seconds if self.scoring_seconds > 0 else 0.0

    def totals(self, key: str) -> int:
        """An engine counter (models.engine.STATS, or compiles_during_job) over all engines."""
        return sum(e[key] for e in self.engines)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"items_per_s": self.items_per_s}

    def line(self) -> str:
        return (
            f"batch: {self.rows} rows, {self.items} items, {self.errors} errors in "
            f"{self.seconds:.1f} s ({self.items_per_s:.1f} items/s over "
            f"{self.scoring_seconds:.1f} s of scoring; {len(self.engines)} engines, prefix "
            f"hits/misses {self.totals('prefix_hits')}/{self.totals('prefix_misses')}, "
            f"{self.totals('compiles_during_job')} compiles after warm-up) -> {self.output}"
        )


# ------------------------------------------------------------------ rows -> responses


def _pair_message(message: str) -> str:
    """A pair row's error names its `item`, not the request's `items[0]` it was checked as."""
    return re.sub(r"\bitems(?:\.0|\[0\])?(?=[:.\[ ])", "item", message)


class RowScorer:
    """A batch of rows (dicts) -> per row its scores or its error, by the offline scorer's
    checks and one engine call for the whole batch. Pair rows of one query (and labels and
    flags) are scored as one request."""

    def __init__(self, scorer: OfflineScorer, defaults: RowDefaults):
        self.scorer = scorer
        self.defaults = {k: v for k, v in defaults.model_dump().items() if v is not None}

    def score_rows(self, rows: list[Any]) -> list[tuple[Any, str | None]]:
        """Per row (scores, None) or (None, error message)."""
        out: list[tuple[Any, str | None] | None] = [None] * len(rows)
        requests: list[tuple[int, Prepared]] = []
        pairs: dict[tuple, list[tuple[int, Prepared]]] = defaultdict(list)
        for i, row in enumerate(rows):
            pair = _is_pair(row)
            prepared = self.scorer.prepare(self._body(row, pair))
            if isinstance(prepared, dict):
                msg = prepared["message"]
                out[i] = (None, _pair_message(msg) if pair else msg)
            elif pair:
                r = prepared.request
                key = (
                    tuple(prepared.query),
                    tuple(r.label_token_ids),
                    r.apply_softmax,
                    r.item_first,
                )
                pairs[key].append((i, prepared))
            else:
                requests.append((i, prepared))
        # Each query's pairs as one request: its items in one chunk, the query prefilled once.
        groups = [
            (members, dataclasses.replace(members[0][1], items=[p.items[0] for _, p in members]))
            for members in pairs.values()
        ]
        answers = self.scorer.score([p for _, p in requests] + [g for _, g in groups])
        for (i, _), body in zip(requests, answers, strict=False):
            out[i] = (body["scores"], None) if "scores" in body else (None, body["message"])
        for (members, _), body in zip(groups, answers[len(requests) :], strict=True):
            if "scores" in body:
                for k, (i, _) in enumerate(members):
                    out[i] = (body["scores"][k], None)
            else:  # each pair passed alone: score them alone to tell which fails
                for (i, _), alone in zip(
                    members, self.scorer.score([m for _, m in members]), strict=True
                ):
                    ok = "scores" in alone
                    out[i] = (
                        (alone["scores"][0], None)
                        if ok
                        else (None, _pair_message(alone["message"]))
                    )
        return out  # type: ignore[return-value]

    def _body(self, row: Any, pair: bool) -> Any:
        if not isinstance(row, dict):
            return row  # not an object: the request check says so
        # A columnar file holds null where a row lacks a field.
        body = {k: row[k] for k in REQUEST_FIELDS if row.get(k) is not None}
        if pair:
            body.pop("items", None)
            if row.get("item") is not None:
                body["items"] = [row["item"]]
        return self.defaults | body


class _EngineActor:
    """One engine of the pool (Ray Data calls it on each batch): the Scorer replica's engine and
    settings, warmed up (every shape compiled, or loaded from the compilation cache) before
    its first batch."""

    def __init__(self, settings: BatchSettings, lines: bool):
        import ray

        from models.engine import ScoringEngine, use_compilation_cache  # JAX: engines only

        started = time.time()
        use_compilation_cache(cache_root() / "jax")  # a restarted actor starts in seconds
        start = time.perf_counter()
        model = settings.model
        path = model.path or ensure_demo_checkpoint(model.demo_preset)
        self.engine = ScoringEngine(path, settings.engine)
        self.engine.warmup()
        scorer = OfflineScorer(self.engine, settings.model_name(), settings.max_items_per_request)
        self.rows = RowScorer(scorer, settings.defaults)
        self.lines, self.batches = lines, 0
        ctx = ray.get_runtime_context()
        self.info = {
            "engine": f"{ctx.get_actor_id()}/{os.getpid()}",  # a restarted actor: a new pid
            "pid": os.getpid(),
            "node": ctx.get_node_id(),
            "started": started,
            "warmup_s": time.perf_counter() - start,
            "ready": time.time(),
            "compiles_at_ready": self.engine.stats()["compiles"],
        }

    def _report(self) -> str:
        stats = self.engine.stats()
        compiled = stats["compiles"] - self.info["compiles_at_ready"]
        info = self.info | stats | {"batches": self.batches, "compiles_during_job": compiled}
        return json.dumps(info)

    def __call__(self, batch):  # pyarrow.Table -> pyarrow.Table
        import pyarrow as pa

        if self.lines:
            rows: list[Any] = []
            for line in batch.column("text").to_pylist():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_BadJSON(line, f"body: invalid JSON ({e.msg} at column {e.colno})"))
        else:
            rows = batch.to_pylist()
        good = [i for i, r in enumerate(rows) if not isinstance(r, _BadJSON)]
        results: list[tuple[Any, str | None]] = [(None, getattr(r, "error", "")) for r in rows]
        for i, res in zip(good, self.rows.score_rows([rows[i] for i in good]), strict=True):
            results[i] = res
        items = [
            0 if err is not None else _n_items(rows[i], s) for i, (s, err) in enumerate(results)
        ]
        failed = [err is not None for _, err in results]
        if self.lines:
            out = pa.table(
                {_LINE: [_out_line(r, res) for r, res in zip(rows, results, strict=True)]}
            )
        else:
            out = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
            pair = "item" in batch.column_names and "items" not in batch.column_names
            kind = pa.list_(pa.float64()) if pair else pa.list_(pa.list_(pa.float64()))
            out = out.append_column("scores", pa.array([s for s, _ in results], kind))
            out = out.append_column("error", pa.array([e for _, e in results], pa.string()))
        out = out.append_column(_ITEMS, pa.array(items, pa.int64()))
        out = out.append_column(_FAILED, pa.array(failed, pa.bool_()))
        self.batches += 1
        report = [self._report()] + [None] * (len(rows) - 1)
        return out.append_column(_ENGINE, pa.array(report, pa.string()))


@dataclasses.dataclass(frozen=True)
class _BadJSON:
    line: str
    error: str


def _is_pair(row: Any) -> bool:
    """A pair row: an `item` and no `items` (a columnar file holds null for a missing field)."""
    return isinstance(row, dict) and row.get("item") is not None and row.get("items") is None


def _n_items(row: Any, scores: Any) -> int:
    return 1 if _is_pair(row) else len(scores)


def _out_line(row: Any, result: tuple[Any, str | None]) -> str:
    scores, error = result
    if isinstance(row, _BadJSON):
        obj: dict[str, Any] = {"line": row.line}
    elif isinstance(row, dict):
        obj = {k: v for k, v in row.items() if k not in OUTPUT_COLUMNS}
    else:
        obj = {"line": row}
    obj |= {"error": error} if error is not None else {"scores": scores}
    return json.dumps(obj)


# ------------------------------------------------------------------ files


def _filesystem(path: str):
    """(pyarrow filesystem, path in it) of a local path or a URL (s3://, gs://, ...)."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _format(path: str, given: str | None = None) -> str:
    """ "jsonl" or "parquet": `given`, else from the extension (a directory: of its files)."""
    if given:
        if given not in ("jsonl", "parquet"):
            raise ValueError(f"format {given!r}: jsonl or parquet")
        return given
    import pyarrow.fs as pafs

    names = [path]
    fs, where = _filesystem(path)
    if fs.get_file_info(where).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(where, recursive=True))
        names = [i.path for i in infos if i.type == pafs.FileType.File]
    for name in names:
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            return "jsonl"
    raise ValueError(f"{path}: no .jsonl or .parquet file (name the format with --input-format)")


class _Writer:
    """One output file, written in input order as batches arrive, at `<output>.partial-<id>`
    until complete, then renamed to `output` (a rerun replaces it)."""

    def __init__(self, output: str, fmt: str):
        self.fs, self.path = _filesystem(output)
        self.fmt, self.tmp = fmt, f"{self.path}.partial-{uuid.uuid4().hex[:12]}"
        parent = str(Path(self.path).parent)
        self.fs.create_dir(parent, recursive=True)
        self._remove_stale(parent)
        self.stream = self.fs.open_output_stream(self.tmp)
        self.parquet: Any = None
        self.rows = self.items = self.errors = 0
        self.engines: dict[str, dict[str, Any]] = {}  # the latest report of each engine

    def _remove_stale(self, parent: str) -> None:
        import pyarrow.fs as pafs

        prefix = f"{Path(self.path).name}.partial-"
        for info in self.fs.get_file_info(pafs.FileSelector(parent)):
            if info.base_name.startswith(prefix):
                log.info("removing %s (left by a job that did not finish)", info.path)
                self.fs.delete_file(info.path)

    def write(self, table) -> None:
        import pyarrow.compute as pc

        self.rows += table.num_rows
        self.items += pc.sum(table.column(_ITEMS)).as_py() or 0
        self.errors += pc.sum(table.column(_FAILED).cast("int64")).as_py() or 0
        for report in table.column(_ENGINE).drop_null().to_pylist():
            info = json.loads(report)
            self.engines[info["engine"]] = info
        table = table.drop_columns([_ITEMS, _FAILED, _ENGINE])
        if self.fmt == "jsonl":
            if _LINE in table.column_names:
                lines = table.column(_LINE).to_pylist()
            else:
                lines = [json.dumps(r, default=str) for r in _json_rows(table)]
            self.stream.write("".join(f"{line}\n" for line in lines).encode())
            self.stream.flush()
        else:
            self._write_parquet(table)

    def _write_parquet(self, table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if _LINE in table.column_names:  # JSONL in, Parquet out: the objects' keys as columns
            objs = [json.loads(s) for s in table.column(_LINE).to_pylist()]
            objs = [{"scores": None, "error": None} | o for o in objs]
            keys = list(dict.fromkeys(k for o in objs for k in o))
            if self.parquet is not None and not set(keys) <= set(self.parquet.schema.names):
                new = sorted(set(keys) - set(self.parquet.schema.names))
                raise ValueError(
                    f"JSONL rows with new keys {new} after the first batch: write .jsonl"
                )
            schema = self.parquet.schema if self.parquet is not None else None
            table = pa.Table.from_pylist(objs, schema=schema)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.stream, table.schema)
        self.parquet.write_table(table.cast(self.parquet.schema))

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        elif self.fmt == "parquet":  # no rows at all: an empty file with no columns
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self.stream)
        self.stream.close()
        self.fs.move(self.tmp, self.path)

    def abort(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.stream.close()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.tmp)


def _json_rows(table) -> list[dict[str, Any]]:
    """Rows for a JSONL file: an output column left null is left out."""
    rows = table.to_pylist()
    for r in rows:
        for c in OUTPUT_COLUMNS:
            if r.get(c) is None:
                r.pop(c, None)
    return rows


# ------------------------------------------------------------------ the job


def pool_size(pool: PoolArgs) -> int:
    """Engines the cluster holds (PoolArgs.num_engines)."""
    import ray

    if pool.num_engines:
        return pool.num_engines
    total = ray.cluster_resources()
    need = {"CPU": pool.num_cpus, "GPU": pool.num_gpus} | pool.resources
    fits = [
        int((total.get(r, 0.0) - (1.0 if r == "CPU" else 0.0)) // amount)
        for r, amount in need.items()
        if amount > 0
    ]
    if not pool.num_gpus and not pool.resources:  # CPU engines: one per node
        fits.append(sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))
    return max(1, min(fits, default=1))


def run_batch(
    input: str,
    output: str,
    settings: BatchSettings | None = None,
    *,
    input_format: str | None = None,
    address: str | None = None,
    on_progress: Callable[[BatchSummary], None] | None = None,
) -> BatchSummary:
    """Score every row of `input` (JSONL or Parquet, file or directory, local or a URL) into
    `output` (format from its extension: .jsonl or .parquet) on the Ray cluster at `address`
    (default: Ray's rules: RAY_ADDRESS, a cluster started on this host, else a new local one;
    already connected: that one). `on_progress`: called with the summary so far after each
    batch written (in the driver)."""
    import ray
    import ray.data

    settings = settings or BatchSettings()
    start = time.perf_counter()
    out_fmt = _format(output)
    in_fmt = _format(input, input_format)
    if not ray.is_initialized():
        extra = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, **extra)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the output file in input order
    read_cpus = 0.25  # reading is I/O: it leaves the engines their cores
    if in_fmt == "jsonl":
        ds = ray.data.read_text(input, num_cpus=read_cpus)
    else:
        ds = ray.data.read_parquet(input, num_cpus=read_cpus)
    n = pool_size(settings.pool)
    pool = settings.pool
    log.info("batch: %s -> %s, %d engines (%s)", input, output, n, settings.engine)
    scored = ds.map_batches(
        _EngineActor,
        fn_constructor_kwargs={"settings": settings, "lines": in_fmt == "jsonl"},
        batch_size=pool.batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        resources=pool.resources or None,
        # Engines on different nodes where they fit: Ray Data's own default for actor pools
        # (SPREAD; `ray_remote_args_fn`, the way to ask, goes in Ray 2.64); tests/test_multinode.py
        # checks the placement.
    )
    writer = _Writer(output, out_fmt)

    def summary() -> BatchSummary:
        now, engines = time.time(), list(writer.engines.values())
        first_ready = min((e["ready"] for e in engines), default=now)
        return BatchSummary(
            output=output,
            rows=writer.rows,
            items=writer.items,
            errors=writer.errors,
            seconds=time.perf_counter() - start,
            scoring_seconds=max(now - first_ready, 1e-9),
            engines=engines,
        )

    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(table)
            if on_progress is not None:
                on_progress(summary())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    done = summary()
    log.info("%s", done.line())
    return done


# ------------------------------------------------------------------ command line


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="score JSONL/Parquet files of requests or pairs on Ray Data (an engine actor pool)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="JSONL or Parquet file or directory, or URL")
    p.add_argument("--output", required=True, help="output file: .jsonl or .parquet (or URL)")
    p.add_argument("--input-format", choices=("jsonl", "parquet"), default=None)
    p.add_argument(
        "--config",
        default=None,
        help="a Serve config file (e.g. configs/config.yaml): model, engine and limits from "
        "its application's args; flags below override",
    )
    p.add_argument("--app", default=None, help="the application in --config (default: the only)")
    p.add_argument("--model-path", default=None, help="checkpoint dir (on every node)")
    p.add_argument("--model-name", default=None, help="name a row's `model` may give")
    add_engine_flags(p)
    p.add_argument("--max-items", type=int, default=None, help="items per request row")
    p.add_argument(
        "--num-engines",
        type=int,
        default=None,
        help=PoolArgs.model_fields["num_engines"].description,
    )
    p.add_argument("--engine-num-cpus", type=float, default=None)
    p.add_argument("--engine-num-gpus", type=float, default=None)
    p.add_argument("--engine-resources", type=json.loads, default=None, help='JSON: {"TPU": 4}')
    p.add_argument(
        "--batch-rows", type=int, default=None, help=PoolArgs.model_fields["batch_rows"].description
    )
    p.add_argument("--label-token-ids", default=None, help="for rows without them: 9454,2753")
    p.add_argument("--apply-softmax", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--item-first", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--summary", default=None, help="also write the summary here, as JSON")
    p.add_argument(
        "--address", default=None, help="Ray cluster (default: Ray's rules; local: a new one)"
    )
    p.set_defaults(func=_cmd_batch)


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    base = (
        BatchSettings.from_serve_config(args.config, args.app) if args.config else BatchSettings()
    )
    model = base.model.model_dump()
    if args.model_path:
        model["path"] = args.model_path
    if args.model_name:
        model["name"] = args.model_name
    pool = base.pool.model_dump()
    for flag, key in (("num_engines", "num_engines"), ("engine_num_cpus", "num_cpus"),
                      ("engine_num_gpus", "num_gpus"), ("engine_resources", "resources"),
                      ("batch_rows", "batch_rows")):  # fmt: skip
        if getattr(args, flag) is not None:
            pool[key] = getattr(args, flag)
    labels = args.label_token_ids
    defaults = {
        "label_token_ids": [int(x) for x in labels.split(",")] if labels else None,
        "apply_softmax": args.apply_softmax,
        "item_first": args.item_first,
    }
    return BatchSettings(
        model=ModelArgs.model_validate(model),
        engine=engine_config(args, base.engine),
        max_items_per_request=args.max_items or base.max_items_per_request,
        pool=PoolArgs.model_validate(pool),
        defaults=RowDefaults.model_validate(defaults),
    )


def _cmd_batch(args: argparse.Namespace) -> int:
    summary = run_batch(
        args.input,
        args.output,
        settings_from_args(args),
        input_format=args.input_format,
        address=args.address,
    )
    print(summary.line())
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
    return 0
