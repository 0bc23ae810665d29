"""`mis-score batch` on Ray Data (the session's Ray cluster): scores bit-identical to
`mis-score score` (OfflineScorer, the service's checks and scoring core) over mixed sizes, both
row layouts, JSONL and Parquet; a killed engine actor loses and duplicates nothing; pairs of a
query cost one prefill per engine; a Parquet output's schema is fixed before its first row; an
input mixing the layouts is refused before anything is written; a running job's partial file
is left alone. The loopback multi-node run is in tests/test_multinode.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mis_score import batch
from mis_score.batch import BatchSettings, PoolArgs, RowDefaults, run_batch
from mis_score.offline import OfflineScorer
from models.engine import EngineConfig
from tests.conftest import LABELS, TEST_ENGINE, serve_cluster

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)


def request_rows(seed: int, n: int) -> list[dict]:
    """Token-id requests of every size the test engine accepts (queries of 1-512 tokens, 1-40
    items of 1-64 tokens, 1-32 labels, both apply_softmax), an id column each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        query = rng.integers(0, 151_000, int(rng.choice([1, 9, 60, 200, 512]))).tolist()
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, 65))).tolist()
            for _ in range(int(rng.integers(1, 41)))
        ]
        labels = rng.integers(0, 151_000, int(rng.choice([1, 2, 3, 32]))).tolist()
        rows.append(
            {"id": f"r{seed}-{i}", "query": query, "items": items, "label_token_ids": labels}
            | {"apply_softmax": bool(i % 2)}
        )
    return rows


def pair_rows(seed: int, queries: int, per_query: int) -> list[dict]:
    """Pair rows, the pairs of a query together (as a candidate table sorted by user)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        query = rng.integers(0, 151_000, int(rng.integers(20, 300))).tolist()
        for k in range(per_query):
            item = rng.integers(0, 151_000, int(rng.integers(1, 65))).tolist()
            rows.append({"user": q, "cand": k, "query": query, "item": item})
    return rows


BAD_REQUESTS = [
    {"id": "bad-label", "query": [1], "items": [[1]], "label_token_ids": [10**9]},
    {"id": "bad-long-item", "query": [1, 2], "items": [[1] * 65], "label_token_ids": [1]},
    {"id": "bad-model", "query": [1], "items": [[1]], "label_token_ids": [1], "model": "x"},
]


def settings(ckpt: str, batch_rows: int, **defaults) -> BatchSettings:
    return BatchSettings(
        model={"path": ckpt},
        engine=EngineConfig(**TEST_ENGINE, mode="prefix"),
        pool=PoolArgs(num_engines=1, num_cpus=0.5, batch_rows=batch_rows),
        defaults=RowDefaults(**defaults),
    )


def reference(scorer: OfflineScorer, row: dict, defaults: dict | None = None) -> dict:
    """What `mis-score score` answers for the row's request (a pair: the one-item request)."""
    body = {k: v for k, v in row.items() if k in batch.REQUEST_FIELDS}
    if "item" in row:
        body["items"] = [row["item"]]
    return scorer.score_body((defaults or {}) | body)


def check_row(got: dict, row: dict, ref: dict, pair: bool = False) -> None:
    """The output row: its input columns unchanged, and the reference's scores bit for bit (a
    pair: its own score list) or its error message (a pair's names its `item`)."""
    assert {k: got[k] for k in row} == row
    if ref.get("object") == "error":
        want = re.sub(r"^items(\[0\])?", "item", ref["message"]) if pair else ref["message"]
        assert "scores" not in got and got["error"] == want
    else:
        want = ref["scores"][0] if pair else ref["scores"]
        assert "error" not in got and got["scores"] == want  # ==: bit for bit


@pytest.fixture(scope="module")
def scorer(engine):
    return OfflineScorer(engine("qwen3", "prefix"), "qwen3", max_items=2048)


DEFAULTS = {"label_token_ids": LABELS, "apply_softmax": True}  # the JSONL job's row defaults


def _jsonl_job(tmp: Path, ckpt: str):
    """JSONL requests (token ids and text, mixed sizes, labels from a row or the job's
    defaults) and bad rows, 2 rows per engine call; the engine is SIGKILLed once 4 rows are
    written."""
    text = {"id": "text", "query": "Is it light?", "items": ["1 kg", "3 kg"]}
    rows = request_rows(seed=1, n=12) + [text | {"label_token_ids": LABELS}]
    rows += [{"id": "defaults", "query": [5, 6], "items": [[7], [8, 9]]}]
    rows += BAD_REQUESTS + [{"id": "empty", "query": [1]}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    killed: dict = {}

    def kill_once(progress) -> None:
        if not killed and progress.rows >= 4:
            (eng,) = progress.engines
            os.kill(eng["pid"], signal.SIGKILL)
            killed.update(rows=progress.rows, engine=eng["engine"])

    def run():
        out = str(tmp / "out.jsonl")
        job = settings(ckpt, 2, **DEFAULTS)
        return run_batch(str(tmp / "in.jsonl"), out, job, on_progress=kill_once), killed

    return run, rows


def _parquet_job(tmp: Path, ckpt: str):
    """A directory of two Parquet files of requests (a crashed run's leftover beside the
    output) -> one Parquet file."""
    rows = request_rows(seed=3, n=16) + BAD_REQUESTS
    # Every row with every column (a Parquet table holds null where a row lacks one).
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in keys} for r in rows]
    schema = pa.Table.from_pylist(rows).schema
    (tmp / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10], schema=schema), tmp / "in" / "0.parquet")
    # The second file has a column the first lacks (its rows hold it, the first file's null).
    rows = rows[:10] + [r | {"note": f"n{i}"} for i, r in enumerate(rows[10:])]
    schema = schema.append(pa.field("note", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows[10:], schema=schema), tmp / "in" / "1.parquet")
    # A crashed run's partial file (from before leases: only its age tells it is dead).
    leftover = tmp / "out.parquet.partial-0123"
    leftover.write_text("left by a crashed run")
    os.utime(leftover, (time.time() - 3600,) * 2)
    return lambda: run_batch(str(tmp / "in"), str(tmp / "out.parquet"), settings(ckpt, 8)), rows


PAIRS_BAD = (20, 40)  # pair rows with an item longer than max_item_tokens: after a good batch


def _pairs_job(tmp: Path, ckpt: str):
    """JSONL pair rows of 4 queries (labels and apply_softmax as keys) and a text pair,
    Parquet out, 16 rows per engine call: the first batch all scored, then bad pairs and a key
    the first batch lacked (as in issue 39's report, where this job died)."""
    rows = pair_rows(seed=4, queries=4, per_query=12)
    rows.append({"user": 8, "query": "text pair", "item": "an item"})
    rows += [{"user": 9, "query": [5, 6], "item": [10**9]}, {"user": 10, "query": [5, 6]}]
    for i, r in enumerate(rows):
        r.update(label_token_ids=LABELS, apply_softmax=i % 3 == 0)
    for i in PAIRS_BAD:
        rows[i]["item"] = [1] * 65
    rows[30]["note"] = "a key no earlier row has"
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp / "scores.parquet")
    return lambda: run_batch(str(tmp / "pairs.jsonl"), out, settings(ckpt, 16)), rows


def parquet_rows(path: Path) -> list[dict]:
    """A Parquet output's rows as JSON objects: JSON-text columns parsed, nulls left out."""
    table = pq.read_table(path)
    text = [f.name for f in table.schema if (f.metadata or {}).get(b"encoding") == b"json"]
    return [
        {k: json.loads(v) if k in text else v for k, v in row.items() if v is not None}
        for row in table.to_pylist()
    ]


@pytest.fixture(scope="module")
def jobs(ckpts, engine, tmp_path_factory):
    """The three jobs at once on the session's cluster (an engine actor each): name ->
    (result, input rows, job dir)."""
    serve_cluster()
    # The jobs' engines have the reference engine's settings: its warm-up compiles their
    # programs once into the run's compilation cache, and the three load them (started cold
    # together, each compiled all of them: three times the CPU of one).
    engine("qwen3", "prefix").warmup()
    made = {}
    for name, job in (("jsonl", _jsonl_job), ("parquet", _parquet_job), ("pairs", _pairs_job)):
        tmp = tmp_path_factory.mktemp(name)
        made[name] = (*job(tmp, ckpts["qwen3"]), tmp)
    with concurrent.futures.ThreadPoolExecutor(len(made)) as pool:
        futures = {name: pool.submit(run) for name, (run, _, _) in made.items()}
    return {name: (futures[name].result(), rows, tmp) for name, (_, rows, tmp) in made.items()}


def test_jsonl_requests_bit_identical_and_a_killed_engine_loses_nothing(jobs, scorer):
    """JSONL requests, bad rows, the engine SIGKILLed mid-job: every input row is in the
    output exactly once, in input order, bit-identical to `mis-score score`; Ray restarted the
    actor and retried its batches; nothing compiled after warm-up."""
    (summary, killed), rows, tmp = jobs["jsonl"]
    n_lines = len(rows) + 1  # and the bad JSON line
    assert killed and killed["rows"] < n_lines, "the engine was not killed mid-job"
    # The killed engine's batches and its restarted process's (a new pid).
    assert len(summary.engines) == 2 and killed["engine"] in {e["engine"] for e in summary.engines}
    assert summary.totals("compiles_during_job") == 0

    got = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    assert len(got) == n_lines == summary.rows  # every row once, in input order
    for g, row in zip(got, rows, strict=False):
        check_row(g, row, reference(scorer, row, DEFAULTS))
    assert got[-1] == {"line": "{not json", "error": scorer.score_line("{not json")["message"]}
    errors = {g.get("id"): g["error"] for g in got if "error" in g}
    assert errors["bad-long-item"].startswith("items[0]: ")
    assert errors["empty"].startswith("items: ")
    assert summary.errors == len(errors)  # the bad JSON line's under None
    assert summary.items == sum(len(g["scores"]) for g in got if "scores" in g)
    assert not list(tmp.glob("*.partial-*"))


def test_parquet_requests_to_parquet_bit_identical(jobs, scorer):
    """Parquet requests (a directory, the second file with a column the first lacks) ->
    Parquet: id columns kept, scores bit-identical to `mis-score score`, bad rows' errors in
    place after batches with none; the crashed run's leftover removed."""
    summary, rows, tmp = jobs["parquet"]
    got = pq.read_table(tmp / "out.parquet").to_pylist()
    assert len(got) == len(rows) == summary.rows and summary.errors == len(BAD_REQUESTS)
    for g, row in zip(got, rows, strict=True):
        ref = reference(scorer, {k: v for k, v in row.items() if v is not None})
        if ref.get("object") == "error":
            assert g["scores"] is None and g["error"] == ref["message"]
        else:
            assert g["error"] is None and g["scores"] == ref["scores"]  # ==: bit for bit
        assert {k: g[k] for k in row} == row
    assert not list(tmp.glob("*.partial-*"))


def test_pairs_jsonl_to_parquet_one_prefill_per_query_per_engine(jobs, scorer):
    """JSONL pairs -> Parquet, bad pairs and a new key after an all-scored first batch: every
    row in its place, each pair's score list `mis-score score`'s for its one-item request, bit
    for bit; the schema as its rows need it (`query` and `item`, token ids in most rows and
    text in one, as JSON text); the engine prefilled each query once (prefix misses ==
    queries)."""
    summary, rows, tmp = jobs["pairs"]
    got = parquet_rows(tmp / "scores.parquet")
    assert len(got) == len(rows) == summary.rows
    for g, row in zip(got, rows, strict=True):
        check_row(g, row, reference(scorer, row), pair=True)
    errors = {i: g["error"] for i, g in enumerate(got) if "error" in g}
    assert sorted(errors) == [*PAIRS_BAD, len(rows) - 2, len(rows) - 1]
    assert all(e.startswith("item: ") for e in errors.values()), errors
    schema = pq.read_schema(tmp / "scores.parquet")
    assert schema.names == [*rows[0], "note", "scores", "error"]
    assert schema.field("query").metadata == {b"encoding": b"json"} == schema.field("item").metadata
    assert schema.field("user").type == pa.int64() and schema.field("note").type == pa.string()
    assert schema.field("scores").type == pa.list_(pa.float64())
    (eng,) = summary.engines
    # One prefill per query (4, and the text pair's); a query's later batches (and its pairs
    # of the other apply_softmax, one more chunk of the same query) read its cached K/V.
    assert eng["prefix_misses"] == 5 and eng["prefix_hits"] >= 4
    assert summary.items == 47 and eng["compiles_during_job"] == 0


def test_pairs_of_one_query_under_two_adapters_are_two_requests(ckpts, tmp_path):
    """Pair rows share a query but not a `model`: each scored with its own adapter (one
    request per query and adapter), equal to its one-item request; the base's name and no
    `model` are one group."""
    from models.adapters import write_random_adapter
    from models.checkpoint import read_hf_config
    from models.config import from_hf_config
    from models.engine import ScoringEngine

    cfg = from_hf_config(read_hf_config(ckpts["qwen3"]))
    adapter = write_random_adapter(cfg, tmp_path / "a", rank=4, seed=3)
    config = EngineConfig(mode="prefix", max_adapters=1, **TEST_ENGINE)
    scorer = OfflineScorer(ScoringEngine(ckpts["qwen3"], config, {"a": str(adapter)}), "qwen3", 64)
    rows = [
        {"query": [5, 6, 7, 8], "item": [9, 10 + k], **({"model": m} if m else {})}
        for k, m in enumerate([None, "a", "qwen3", "a"])
    ]
    rs = batch.RowScorer(scorer, RowDefaults(label_token_ids=LABELS), batch.Layout.PAIRS)
    got = rs.score_rows(rows)
    for row, (scores, error) in zip(rows, got, strict=True):
        assert error is None, error
        body = {"query": row["query"], "items": [row["item"]], "label_token_ids": LABELS}
        (want,) = scorer.score_body(body | ({"model": row["model"]} if "model" in row else {}))[
            "scores"
        ]
        assert scores == want, row
    assert got[1][0] != got[0][0]  # the adapter moved the score


def test_default_labels_are_not_a_classifier_adapters(ckpts, tmp_path):
    """The job's default label_token_ids go to the LM's rows, not to the rows of an adapter
    that turns it into a classifier (its head reads classes): both kinds in one job."""
    from models.engine import ScoringEngine
    from tests.hf_families import write_cls_adapter

    adapter = write_cls_adapter(
        ckpts["qwen3"], tmp_path / "cls", 5, num_labels=2, task_type="SEQ_CLS"
    )
    config = EngineConfig(mode="prefix", max_adapters=1, **TEST_ENGINE)
    scorer = OfflineScorer(ScoringEngine(ckpts["qwen3"], config, {"cls": adapter}), "qwen3", 64)
    rows = [{"query": [5, 6, 7], "items": [[8, 9], [10]]}, {"query": [5, 6, 7], "items": [[8, 9]]}]
    rows[1]["model"] = "cls"
    rs = batch.RowScorer(scorer, RowDefaults(label_token_ids=LABELS), batch.Layout.REQUESTS)
    (lm, lm_error), (cls, cls_error) = rs.score_rows(rows)
    assert lm_error is None and cls_error is None, (lm_error, cls_error)
    assert np.asarray(lm).shape == (2, len(LABELS)) and np.asarray(cls).shape == (1, 2)


def _actor_table(rows: list, results: list) -> pa.Table:
    """A batch as a JSONL input's engine actor hands it to the writer."""
    return pa.table(
        {
            batch._LINE: [batch._out_line(r, res) for r, res in zip(rows, results, strict=True)],
            batch._ITEMS: [0 if e else 1 for _, e in results],
            batch._FAILED: [e is not None for _, e in results],
            batch._ENGINE: pa.nulls(len(rows), pa.string()),
        }
    )


def _write_jsonl_to_parquet(out: Path, batches: list[tuple[list, list]]) -> list[dict]:
    """The driver's part of a JSONL -> Parquet job on these (rows, results) batches: the scan,
    the schema, the writer; the output's rows."""
    scan = batch.InputScan()
    for rows, _ in batches:
        scan.add_rows(rows, ["in.jsonl"] * len(rows))
        scan.add_types([batch._row_object(r) for r in rows])
    writer = batch._Writer(str(out), "parquet", batch.output_schema(scan))
    for rows, results in batches:
        writer.write(_actor_table(rows, results))
    writer.close()
    return parquet_rows(out)


def test_jsonl_to_parquet_schema_fixed_before_the_first_row(tmp_path):
    """The Parquet writer of a JSONL input (no cluster: the batches an engine actor returns):
    a first batch all scored then a bad row, a first batch all errors then scores, a key the
    first batch lacked, a key whose values differ in type, a bad JSON line: every row
    written, as its JSONL line would be."""
    ok, bad = ([[0.25, 0.75]], None), (None, "items[0]: 65 tokens; at most 64")
    req = [{"id": i, "query": [1, 2], "items": [[3]], "w": i, "big": 2**60} for i in range(6)]
    text = {"id": 6, "query": "text", "items": ["a"], "note": {"k": 1}, "w": 0.5, "big": 0.5}
    not_json = batch._parse_line("{x")
    cases = {
        "good-then-bad": [(req[:3], [ok] * 3), (req[3:], [ok, bad, ok])],
        "bad-then-good": [
            (req[:2], [bad] * 2),
            (req[2:] + [text, not_json], [ok] * 4 + [bad, (None, not_json.error)]),
        ],
    }
    for name, batches in cases.items():
        got = _write_jsonl_to_parquet(tmp_path / f"{name}.parquet", batches)
        want = [
            json.loads(batch._out_line(r, res))
            for rows, results in batches
            for r, res in zip(rows, results, strict=True)
        ]
        assert got == want, name
    schema = pq.read_schema(tmp_path / "bad-then-good.parquet")
    assert schema.names == ["id", "query", "items", "w", "big", "note", "line", "scores", "error"]
    assert schema.field("id").type == pa.int64() and schema.field("note").type.num_fields == 1
    assert schema.field("w").type == pa.float64()  # integers, then a float
    for name in ("query", "items", "big"):  # token ids and text; 2**60 and a float
        assert schema.field(name).metadata == {b"encoding": b"json"}, name


def test_mixed_layouts_refused_before_anything_is_written(ckpts, tmp_path):
    """An input of request rows and pair rows (JSONL; Parquet with both `items` and `item`
    columns) is refused before a row is scored or a file written, naming the first row of
    the second layout and the first of the first (rows without either layout: bad rows of
    either, not counted)."""
    serve_cluster()
    rows = request_rows(seed=5, n=3) + [{"id": "neither", "query": [1]}]
    rows += [{"id": "pair", "query": [1], "item": [2]}]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n{bad\n\n")
    src.write_text(src.read_text() + "".join(json.dumps(r) + "\n" for r in rows[3:]))
    pairs = [{"query": [1], "item": [2], "items": None}] * 2 + [
        {"query": [1], "item": None, "items": [[2]]}
    ]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "mixed.parquet")
    # Row 6 of the JSONL file: its blank line is not a row.
    for name, row, first in (("mixed.jsonl", 6, 1), ("mixed.parquet", 3, 1)):
        layouts = ("pair", "request") if name.endswith("jsonl") else ("request", "pair")
        path = re.escape(str(tmp_path / name))
        want = f"{path} row {row}: a {layouts[0]} row .* where {path} row {first} is a {layouts[1]}"
        out = tmp_path / "out" / "scores.parquet"
        with pytest.raises(ValueError, match=want):
            run_batch(str(tmp_path / name), str(out), settings(ckpts["qwen3"], 4))
        assert not out.parent.exists() or not list(out.parent.iterdir())


def _dead_job_partial(out: Path) -> str:
    """The partial file of a job on this host that was SIGKILLed while writing `out`."""
    code = (
        "import os, signal, sys; from mis_score.batch import _Writer; "
        "print(_Writer(sys.argv[1], 'jsonl').tmp, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout.strip()


def test_a_running_jobs_partial_file_survives_a_new_job(tmp_path):
    """A job removes the partial files of jobs that are gone (its host's, a pid not running;
    any host's, no heartbeat for _STALE_S; from before leases: as old) and leaves those of
    jobs still writing the same output (this process's, another host's with a fresh lease, a
    fresh one from before leases)."""
    out = tmp_path / "scores.jsonl"
    dead = _dead_job_partial(out)
    running = batch._Writer(str(out), "jsonl")
    old = time.time() - 86_400  # older than the stale rule (checked below)
    other_host = {"host": "elsewhere", "pid": os.getpid()}
    files = {}
    for name, lease, mtime in (
        ("other-host", other_host, None),
        ("other-host-silent", other_host, old),
        ("before-leases", None, None),
        ("before-leases-old", None, old),
    ):
        files[name] = path = Path(f"{out}.partial-{name}")
        path.write_text("rows")
        if lease is not None:
            Path(f"{path}.lease").write_text(json.dumps(lease))
        if mtime is not None:
            for f in (path, Path(f"{path}.lease")):
                if f.exists():
                    os.utime(f, (mtime, mtime))
    new = batch._Writer(str(out), "jsonl")
    left = sorted(f.name for f in tmp_path.iterdir())
    kept = [running.tmp, files["other-host"], files["before-leases"], new.tmp]
    want = sorted(Path(f).name for f in kept)
    want += [Path(f"{f}.lease").name for f in (running.tmp, files["other-host"], new.tmp)]
    assert left == sorted(want), (dead, left)
    new.abort()
    running.close()
    assert out.exists() and not Path(running.tmp).exists()
    assert batch._STALE_S < 86_400


def test_settings_from_a_serve_config_and_flags():
    """--config takes the model, engine and limits of the Serve config's application; flags
    override single fields."""
    import yaml

    from mis_score.cli import build_parser
    from serve_app.config import AppArgs

    args = build_parser().parse_args(
        ["batch", "--input", "a.jsonl", "--output", "b.parquet", "--config", "configs/config.yaml"]
        + ["--max-batch-tokens", "8192", "--label-token-ids", "1,2", "--num-engines", "3"]
    )
    got = batch.settings_from_args(args)
    raw = yaml.safe_load(Path("configs/config.yaml").read_text())
    app = AppArgs.parse(raw["applications"][0]["args"])
    assert got.engine == app.engine.model_copy(update={"max_batch_tokens": 8192})
    assert got.model == app.model and got.model_name() == "qwen3-tiny-random-seed0"
    assert got.max_items_per_request == app.limits.max_items_per_request
    assert got.defaults.label_token_ids == [1, 2] and got.pool.num_engines == 3
