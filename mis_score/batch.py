"""`mis-score batch`: Score API requests from files to files on Ray Data, with the service's
request checks and scoring core (mis_score.offline.OfflineScorer) in an actor pool of engines.

    read (JSONL lines / Parquet rows)  ->  map_batches(_EngineActor, actor pool)  ->  the driver
    writes one output file, in input order, to `<output>.partial-<id>`, renamed when complete

Two row layouts, one per input: Score API requests (`query`, `items`, `label_token_ids`, ...)
or pairs (`query`, `item`, ...), the pairs of a batch with the same query scored as one request
(one prefill per engine: its K/V stay in the engine's prefix pool). Every other column is kept.
Each output row is its input row plus `scores` (the response's scores; a pair's own score list)
or `error` (the error body's message, naming the field); a bad row never stops the job.

Before anything is scored the driver reads the input once more (InputScan): a JSONL input's
rows, or a Parquet input's `item`/`items` columns where it has both. An input mixing the two
layouts is refused there, naming the row. The output's schema is fixed before the first row is
written (output_schema): `scores` and `error` typed, the input columns from the Parquet input's
schema, or from the JSONL input's keys and value types (a key whose values differ in type is
written as JSON text).

Idempotent, not resumable: a job that dies leaves no output file (only its `.partial-*`, removed
by a later run once its writer is provably gone: _Lease), and a rerun writes a complete new
output. A dead engine actor is restarted by Ray and its batches retried (Ray Data's actor pool:
max_restarts and max_task_retries -1); the driver writes each batch it receives once, so no row
is lost and none is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mis_api.long_items import LongItems
from mis_api.schema import ScoreRequest
from mis_score.offline import (
    OfflineScorer,
    Prepared,
    adapters_from_args,
    add_adapter_flag,
    add_engine_flags,
    engine_config,
)
from models.checkpoint import cache_root, demo_checkpoint_dir, ensure_demo_checkpoint
from serve_app.config import AppArgs, LimitsArgs, ModelArgs, ModelEngine

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
    item_prefix: str | list[int] | None = None
    item_suffix: str | list[int] | None = None
    long_items: LongItems | None = None
    model: str | None = None


class BatchSettings(ModelEngine):
    """What a batch job runs with: the service's `model` and `engine` (their home:
    serve_app.config.ModelEngine), its request limit, and the pool's settings."""

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
    scan_seconds: float  # the input read once before scoring (InputScan)
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


class Layout(enum.Enum):
    """An input's rows: Score API requests, or one (query, item) pair each."""

    REQUESTS = "requests"
    PAIRS = "pairs"


class RowScorer:
    """A batch of rows (dicts) -> per row its scores or its error, by the offline scorer's
    checks and one engine call for the whole batch. Pair rows of one query (and labels and
    flags) are scored as one request."""

    def __init__(self, scorer: OfflineScorer, defaults: RowDefaults, layout: Layout):
        self.scorer, self.pair = scorer, layout is Layout.PAIRS
        self.defaults = {k: v for k, v in defaults.model_dump().items() if v is not None}

    def score_rows(self, rows: list[Any]) -> list[tuple[Any, str | None]]:
        """Per row (scores, None) or (None, error message)."""
        out: list[tuple[Any, str | None] | None] = [None] * len(rows)
        requests: list[tuple[int, Prepared]] = []
        pairs: dict[tuple, list[tuple[int, Prepared]]] = defaultdict(list)
        pair = self.pair
        for i, row in enumerate(rows):
            prepared = self.scorer.prepare(self._body(row))
            if isinstance(prepared, dict):
                msg = prepared["message"]
                out[i] = (None, _pair_message(msg) if pair else msg)
            elif pair:
                r = prepared.request
                key = (
                    self.scorer.adapter_of(r.model),  # one request runs one adapter
                    tuple(prepared.query),
                    tuple(r.label_token_ids),
                    r.apply_softmax,
                    r.item_first,
                    r.long_items,  # how its windows pool
                )
                pairs[key].append((i, prepared))
            else:
                requests.append((i, prepared))
        # Each query's pairs as one request: its items in one chunk, the query prefilled once
        # (a pair cut into windows: all of them, pooled back into the pair's score).
        groups = [(members, _one_request([p for _, p in members])) for members in pairs.values()]
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

    def _body(self, row: Any) -> Any:
        if not isinstance(row, dict):
            return row  # not an object: the request check says so
        # A columnar file holds null where a row lacks a field (inside a struct too).
        body = {k: _no_nulls(row[k]) for k in REQUEST_FIELDS if row.get(k) is not None}
        if self.pair:
            body.pop("items", None)
            if row.get("item") is not None:
                body["items"] = [row["item"]]
        out = self.defaults | body
        model = out.get("model")
        if "label_token_ids" not in body and (model is None or isinstance(model, str)):
            kind, _ = self.scorer.engine.head_of(self.scorer.adapter_of(model))
            if kind == "classification":  # its head reads classes: the default labels are not its
                out.pop("label_token_ids", None)
        return out


def _no_nulls(value: Any) -> Any:
    """A struct column's value without its null fields (a field the row does not set)."""
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    return value


def _one_request(pairs: list[Prepared]) -> Prepared:
    """Pair rows of one query (and adapter, labels and flags) as one request of their items."""
    items = [it for p in pairs for it in p.items]
    counts = tuple(len(p.items) for p in pairs)
    cut = next((p.windows for p in pairs if p.windows is not None), None)
    windows = None if cut is None else dataclasses.replace(cut, counts=counts)
    return dataclasses.replace(pairs[0], items=items, windows=windows)


class _EngineActor:
    """One engine of the pool (Ray Data calls it on each batch): the Scorer replica's engine and
    settings, warmed up (every shape compiled, or loaded from the compilation cache) before
    its first batch."""

    def __init__(self, settings: BatchSettings, lines: bool, layout: Layout):
        import ray

        from models.engine import ScoringEngine, use_compilation_cache  # JAX: engines only

        started = time.time()
        use_compilation_cache(cache_root() / "jax")  # a restarted actor starts in seconds
        start = time.perf_counter()
        model = settings.model
        path = model.path or ensure_demo_checkpoint(model.demo_preset)
        self.engine = ScoringEngine(path, settings.engine, model.adapters)
        self.engine.warmup()
        scorer = OfflineScorer(self.engine, settings.model_name(), settings.max_items_per_request)
        self.rows = RowScorer(scorer, settings.defaults, layout)
        self.scores_type = _scores_type(layout)
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
            rows = [_parse_line(line) for line in batch.column("text").to_pylist()]
        else:
            rows = batch.to_pylist()
        good = [i for i, r in enumerate(rows) if not isinstance(r, _BadJSON)]
        results: list[tuple[Any, str | None]] = [(None, getattr(r, "error", "")) for r in rows]
        for i, res in zip(good, self.rows.score_rows([rows[i] for i in good]), strict=True):
            results[i] = res
        items = [0 if err is not None else self._n_items(s) for s, err in results]
        failed = [err is not None for _, err in results]
        if self.lines:
            out = pa.table(
                {_LINE: [_out_line(r, res) for r, res in zip(rows, results, strict=True)]}
            )
        else:
            out = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
            scores = pa.array([s for s, _ in results], self.scores_type)
            out = out.append_column("scores", scores)
            out = out.append_column("error", pa.array([e for _, e in results], pa.string()))
        out = out.append_column(_ITEMS, pa.array(items, pa.int64()))
        out = out.append_column(_FAILED, pa.array(failed, pa.bool_()))
        self.batches += 1
        report = [self._report()] + [None] * (len(rows) - 1)
        return out.append_column(_ENGINE, pa.array(report, pa.string()))

    def _n_items(self, scores: Any) -> int:
        return 1 if self.rows.pair else len(scores)


@dataclasses.dataclass(frozen=True)
class _BadJSON:
    line: str
    error: str


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return _BadJSON(line, f"body: invalid JSON ({e.msg} at column {e.colno})")


def _row_layout(row: Any) -> Layout | None:
    """A row's layout: `items` a request, an `item` and no `items` a pair (a columnar file
    holds null for a missing field); neither: none (a bad row of either layout)."""
    if not isinstance(row, dict):
        return None
    if row.get("items") is not None:
        return Layout.REQUESTS
    return Layout.PAIRS if row.get("item") is not None else None


def _scores_type(layout: Layout):
    import pyarrow as pa

    pair = pa.list_(pa.float64())  # a pair's scores: one per label (or class)
    return pair if layout is Layout.PAIRS else pa.list_(pair)


def _row_object(row: Any) -> dict[str, Any]:
    """A JSONL row's output object without `scores` and `error`: the row's keys (an earlier
    output's `scores`/`error` are replaced), else the line under `line`."""
    if isinstance(row, _BadJSON):
        return {"line": row.line}
    if isinstance(row, dict):
        return {k: v for k, v in row.items() if k not in OUTPUT_COLUMNS}
    return {"line": row}


def _out_line(row: Any, result: tuple[Any, str | None]) -> str:
    scores, error = result
    obj = _row_object(row) | ({"error": error} if error is not None else {"scores": scores})
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


_READ_CPUS = 0.25  # reading is I/O: it leaves the engines their cores


class InputScan:
    """What the driver reads of the input before anything is scored: its layout (an input
    mixing requests and pairs is refused, naming the row) and, for a JSONL input, each key's
    value type. A row is named `<file> row <n>`, n counting from 1 in its file (a JSONL file's
    blank lines, which the job skips, not counted)."""

    def __init__(self, layout: Layout | None = None) -> None:
        self.first: dict[Layout, str] = {layout: "the input's columns"} if layout else {}
        self.types: dict[str, Any] = {}  # JSONL key -> its Arrow type (None: JSON text)
        self._big_ints: dict[str, bool] = {}  # JSONL key -> holds an integer beyond 2**53
        self._path, self._row = "", 0

    @classmethod
    def read(cls, input: str, fmt: str, schema=None) -> InputScan:
        """A JSONL input's rows (through Ray Data, as the job reads them); a Parquet input's
        `item` and `items` columns where its schema has both, read here (the footers say
        where each file's rows are); else its columns say its layout, and no row is read."""
        names = schema.names if schema is not None else []
        if fmt == "parquet" and not {"item", "items"} <= set(names):
            return cls(Layout.PAIRS if "item" in names else Layout.REQUESTS)
        scan = cls()
        if fmt == "parquet":
            import pyarrow.dataset as pads

            fs, where = _filesystem(input)
            files = pads.dataset(where, schema=schema, filesystem=fs, format="parquet")
            for part in files.get_fragments():
                for b in part.to_batches(columns=["item", "items"]):
                    scan.add_rows(b.to_pylist(), [part.path] * b.num_rows)
            return scan
        import ray.data

        ds = ray.data.read_text(input, include_paths=True, num_cpus=_READ_CPUS)
        for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
            rows = [_parse_line(line) for line in b.column("text").to_pylist()]
            scan.add_rows(rows, b.column("path").to_pylist())
            scan.add_types([_row_object(r) for r in rows])
        return scan

    @property
    def layout(self) -> Layout:
        return Layout.PAIRS if Layout.PAIRS in self.first else Layout.REQUESTS

    def add_rows(self, rows: list[Any], paths: list[str]) -> None:
        """The next rows of the input, in order, and the file each came from."""
        for row, path in zip(rows, paths, strict=True):
            self._row = self._row + 1 if path == self._path else 1
            self._path = path
            layout = _row_layout(row)
            if layout is None or layout in self.first:
                continue
            self.first[layout] = f"{path} row {self._row}"
            if len(self.first) == 2:
                (other,) = set(self.first) - {layout}
                raise ValueError(
                    f"{self.first[layout]}: a {_LAYOUT_ROW[layout]} where {self.first[other]} "
                    f"is a {_LAYOUT_ROW[other]}: one layout per input (score requests and "
                    "pairs as two jobs)"
                )

    def add_types(self, objs: list[dict[str, Any]]) -> None:
        """The next rows' output objects (JSONL): each key's type, unified with the earlier
        rows' as Arrow infers one list of values (a value null or missing fits any type, a
        struct gains the fields it lacked, integers and floats make floats), or None where
        no type holds every value exactly (strings and numbers; an integer a float would round,
        beyond 2**53)."""
        import pyarrow as pa

        for key in dict.fromkeys(k for o in objs for k in o):
            if key in self.types and self.types[key] is None:
                continue  # JSON text already
            try:
                values = pa.array([o.get(key) for o in objs])  # raises on mixed or inexact
                self._big_ints[key] = self._big_ints.get(key, False) or _big_ints(values)
                typ = values.type
                if key in self.types:
                    typ = _unify(self.types[key], typ, self._big_ints[key])
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                typ = None
            self.types[key] = typ


def _unify(old, new, big_ints: bool):
    """The type of two batches' values of a key (raises where there is none): as Arrow infers
    it for one batch, so a JSONL key's type does not depend on where batches split."""
    import pyarrow as pa

    two = [pa.schema([("k", old)]), pa.schema([("k", new)])]
    try:
        return pa.unify_schemas(two).field("k").type  # nulls and struct fields only
    except pa.ArrowException:
        if big_ints:
            raise
        return pa.unify_schemas(two, promote_options="permissive").field("k").type


def _big_ints(values) -> bool:
    """Whether an array holds an integer beyond 2**53 (a float64 would round it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = values.type
    if pa.types.is_integer(t):
        lo, hi = pc.min_max(values).values()
        return hi.is_valid and max(abs(lo.as_py()), abs(hi.as_py())) > 2**53
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _big_ints(values.flatten())
    if pa.types.is_struct(t):
        return any(_big_ints(values.field(i)) for i in range(t.num_fields))
    return False


_LAYOUT_ROW = {
    Layout.REQUESTS: "request row (`items`)",
    Layout.PAIRS: "pair row (`item`, no `items`)",
}


def output_schema(scan: InputScan, parquet_input=None):
    """A Parquet output's schema, fixed before its first row: the input's columns (a Parquet
    input's schema; a JSONL input's keys in order of first appearance, each typed by its
    values, or JSON text where they differ in type, or Parquet cannot hold the type: such a
    field's metadata says {"encoding": "json"}), then `scores` (the layout's) and `error`."""
    import pyarrow as pa

    if parquet_input is not None:
        fields = [f for f in parquet_input if f.name not in OUTPUT_COLUMNS]
    else:
        fields = [_jsonl_field(key, typ) for key, typ in scan.types.items()]
    scores = pa.field("scores", _scores_type(scan.layout))
    return pa.schema([*fields, scores, pa.field("error", pa.string())])


def _jsonl_field(name: str, typ: Any):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if typ is not None:
        try:  # e.g. an empty object's struct<> is an Arrow type Parquet cannot write
            pq.write_table(pa.table({name: pa.array([], typ)}), pa.BufferOutputStream())
            return pa.field(name, typ)
        except (pa.ArrowException, NotImplementedError):
            pass
    return pa.field(name, pa.string(), metadata={"encoding": "json"})


def _is_json_text(field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"encoding") == b"json"


_LEASE = ".lease"
_BEAT_S = 30.0  # a running job rewrites its lease this often
_STALE_S = 600.0  # a lease (or a partial file without one) unchanged this long: its job is gone


def _host_id() -> str:
    """This host's kernel and pid namespace: a pid names the same process to every process
    with the same id (containers can share a hostname, each with its own pids)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "/".join(parts)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Lease:
    """`<partial file>.lease`: who writes a partial file (host, pid), rewritten every _BEAT_S
    while the job runs and removed when it ends. A partial file is a dead job's, and a later
    job removes it, when its lease names this host and a pid that is not running, or the lease
    (for a partial file without one: the file) has not changed for _STALE_S: another host's
    job, whose pid cannot be checked from here, or a pid reused since. Plain files, so it holds
    on any filesystem pyarrow writes (a bucket has no locks; NFS locks are not reliable)."""

    def __init__(self, fs, partial: str):
        self.fs, self.path = fs, partial + _LEASE
        self.body = json.dumps({"host": _host_id(), "pid": os.getpid()}).encode()
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mis-batch-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(self.body)

    def _run(self) -> None:
        while not self._stop.wait(_BEAT_S):
            try:
                self._beat()
            except Exception as e:  # a failed beat: the next may pass; _STALE_S is 20 beats
                log.warning("lease %s: %s", self.path, e)

    def release(self) -> None:
        import contextlib

        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.path)

    @staticmethod
    def writer_gone(fs, partial, lease) -> bool:
        """Whether the job of a partial file (FileInfo; None: only its lease is left) and its
        lease (FileInfo or None) is gone."""
        info = lease or partial
        if info.mtime_ns is not None and time.time_ns() - info.mtime_ns > _STALE_S * 1e9:
            return True
        if lease is None:
            return False  # a job from before leases, or a fresh one: the age rule only
        try:
            with fs.open_input_stream(lease.path) as f:
                owner = json.loads(f.read())
        except (OSError, ValueError):
            return False  # half written, or removed just now: the age rule only
        return owner.get("host") == _host_id() and not _pid_running(int(owner["pid"]))


class _Writer:
    """One output file, written in input order as batches arrive, at `<output>.partial-<id>`
    until complete, then renamed to `output` (a rerun replaces it). A Parquet output has its
    schema (output_schema) from the start."""

    def __init__(self, output: str, fmt: str, schema=None):
        self.fs, self.path = _filesystem(output)
        self.fmt, self.tmp = fmt, f"{self.path}.partial-{uuid.uuid4().hex[:12]}"
        parent = str(Path(self.path).parent)
        self.fs.create_dir(parent, recursive=True)
        self._remove_stale(parent)
        self.lease = _Lease(self.fs, self.tmp)
        self.stream = self.fs.open_output_stream(self.tmp)
        self.parquet: Any = None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self.parquet = pq.ParquetWriter(self.stream, schema)
        self.rows = self.items = self.errors = 0
        self.engines: dict[str, dict[str, Any]] = {}  # the latest report of each engine

    def _remove_stale(self, parent: str) -> None:
        """Other jobs' partial files of this output whose writer is gone (_Lease)."""
        import pyarrow.fs as pafs

        prefix = f"{Path(self.path).name}.partial-"
        jobs: dict[str, dict[bool, Any]] = defaultdict(dict)  # partial -> {is lease: info}
        for info in self.fs.get_file_info(pafs.FileSelector(parent)):
            if info.base_name.startswith(prefix):
                lease = info.path.endswith(_LEASE)
                jobs[info.path.removesuffix(_LEASE) if lease else info.path][lease] = info
        for partial, files in jobs.items():
            if _Lease.writer_gone(self.fs, files.get(False), files.get(True)):
                log.info("removing %s (left by a job that did not finish)", partial)
                for info in files.values():
                    self.fs.delete_file(info.path)
            else:
                log.info("leaving %s: another job is writing it", partial)

    def write(self, table) -> None:
        import pyarrow.compute as pc

        self.rows += table.num_rows
        self.items += pc.sum(table.column(_ITEMS)).as_py() or 0
        self.errors += pc.sum(table.column(_FAILED).cast("int64")).as_py() or 0
        for report in table.column(_ENGINE).drop_null().to_pylist():
            info = json.loads(report)
            # Its latest by the engine's own count: batches can reach the driver (in input
            # order) in another order than an engine scored them.
            seen = self.engines.get(info["engine"])
            if seen is None or info["batches"] > seen["batches"]:
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
            self.parquet.write_table(_conform(table, self.parquet.schema))

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        self.stream.close()
        self.fs.move(self.tmp, self.path)
        self.lease.release()

    def abort(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            if self.parquet is not None:
                self.parquet.close()
        with contextlib.suppress(Exception):
            self.stream.close()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.tmp)
        self.lease.release()


def _conform(table, schema):
    """A batch in the output's schema: a JSONL input's objects (`_LINE`) by key, JSON text
    where the schema says so; a Parquet input's columns cast, a missing one null."""
    import pyarrow as pa

    if _LINE in table.column_names:
        objs = [json.loads(s) for s in table.column(_LINE).to_pylist()]
        cols = []
        for f in schema:
            values = [o.get(f.name) for o in objs]
            if _is_json_text(f):
                values = [None if v is None else json.dumps(v) for v in values]
            cols.append(pa.array(values, f.type))
    else:
        n = table.num_rows
        cols = [
            table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.nulls(n, f.type)
            for f in schema
        ]  # fmt: skip
    return pa.Table.from_arrays(cols, schema=schema)


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
    columns = None
    if in_fmt == "jsonl":
        ds = ray.data.read_text(input, num_cpus=_READ_CPUS)
    else:
        ds = ray.data.read_parquet(input, num_cpus=_READ_CPUS)
        columns = ds.schema().base_schema  # the files' footers (Ray unifies them)
    # The layout (a mixed input refused) and the output's schema before any row is scored.
    scanned = time.perf_counter()
    scan = InputScan.read(input, in_fmt, columns)
    scanned = time.perf_counter() - scanned
    schema = output_schema(scan, columns) if out_fmt == "parquet" else None
    n = pool_size(settings.pool)
    pool = settings.pool
    log.info("batch: %s -> %s, %d engines (%s)", input, output, n, settings.engine)
    scored = ds.map_batches(
        _EngineActor,
        fn_constructor_kwargs={
            "settings": settings,
            "lines": in_fmt == "jsonl",
            "layout": scan.layout,
        },
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
    writer = _Writer(output, out_fmt, schema)

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
            scan_seconds=scanned,
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
    add_adapter_flag(p)
    p.add_argument(
        "--model",
        default=None,
        help="for rows without one: the model or adapter name (--adapter) a row scores with",
    )
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
    for frame in ("prefix", "suffix"):
        p.add_argument(
            f"--item-{frame}",
            type=_text_or_ids,
            default=None,
            help=f"for rows without one: the item_{frame} (text, or JSON token ids), never cut",
        )
    p.add_argument(
        "--long-items",
        type=json.loads,
        default=None,
        help='for rows without one: items over the limit, e.g. {"mode": "chunk", "overlap": 32}'
        " (refused by default; the fields: README, Long documents)",
    )
    p.add_argument("--summary", default=None, help="also write the summary here, as JSON")
    p.add_argument(
        "--address", default=None, help="Ray cluster (default: Ray's rules; local: a new one)"
    )
    p.set_defaults(func=_cmd_batch)


def _text_or_ids(value: str) -> str | list[int]:
    """A flag's text, or its token ids written as a JSON list."""
    return json.loads(value) if value.lstrip().startswith("[") else value


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    base = (
        BatchSettings.from_serve_config(args.config, args.app) if args.config else BatchSettings()
    )
    model = base.model.model_dump()
    if args.model_path:
        model["path"] = args.model_path
    if args.model_name:
        model["name"] = args.model_name
    engine = engine_config(args, base.engine)
    if adapters := adapters_from_args(args):
        model["adapters"] = model["adapters"] | adapters
        if args.max_adapters is None:  # every adapter resident
            engine = engine.model_copy(update={"max_adapters": len(model["adapters"])})
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
        "item_prefix": args.item_prefix,
        "item_suffix": args.item_suffix,
        "long_items": args.long_items,
        "model": args.model,
    }
    return BatchSettings(
        model=ModelArgs.model_validate(model),
        engine=engine,
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
