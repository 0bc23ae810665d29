"""`mis-score batch` on Ray Data (the session's Ray cluster): scores bit-identical to
`mis-score score` (OfflineScorer, the service's checks and scoring core) over mixed sizes, both
row layouts, JSONL and Parquet; a killed engine actor loses and duplicates nothing; pairs of a
query cost one prefill per engine. The loopback multi-node run is in tests/test_multinode.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
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


def check_row(got: dict, row: dict, ref: dict) -> None:
    """The output row: its input columns unchanged, and the reference's scores bit for bit (a
    pair: its own score list) or its error message."""
    assert {k: got[k] for k in row} == row
    if ref.get("object") == "error":
        want = ref["message"].replace("items[0]", "item") if "item" in row else ref["message"]
        assert "scores" not in got and got["error"] == want
    else:
        want = ref["scores"][0] if "item" in row else ref["scores"]
        assert "error" not in got and got["scores"] == want  # ==: bit for bit


@pytest.fixture(scope="module")
def scorer(engine):
    return OfflineScorer(engine("qwen3", "prefix"), "qwen3", max_items=2048)


DEFAULTS = {"label_token_ids": LABELS, "apply_softmax": True}  # the JSONL job's row defaults


def _jsonl_job(tmp: Path, ckpt: str):
    """JSONL requests (token ids and text, mixed sizes), pairs of several queries (labels from
    the job's defaults) and bad rows, 2 rows per engine call; the engine is SIGKILLed once 4
    rows are written."""
    text = {"id": "text", "query": "Is it light?", "items": ["1 kg", "3 kg"]}
    rows = request_rows(seed=1, n=12) + [text | {"label_token_ids": LABELS}]
    rows += pair_rows(seed=2, queries=3, per_query=8) + BAD_REQUESTS
    rows += [{"user": 9, "query": [5, 6], "item": [10**9]}, {"id": "empty", "query": [1]}]
    rows.insert(5, {"user": 8, "query": "text pair", "item": "an item"})
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
    for part, chunk in enumerate((rows[:10], rows[10:])):
        pq.write_table(pa.Table.from_pylist(chunk, schema=schema), tmp / "in" / f"{part}.parquet")
    (tmp / "out.parquet.partial-0123").write_text("left by a crashed run")
    return lambda: run_batch(str(tmp / "in"), str(tmp / "out.parquet"), settings(ckpt, 8)), rows


def _pairs_job(tmp: Path, ckpt: str):
    """Parquet pair rows of 4 queries (labels and apply_softmax as columns, one bad pair),
    JSONL out."""
    rows = pair_rows(seed=4, queries=4, per_query=12)
    for i, r in enumerate(rows):
        r.update(label_token_ids=LABELS, apply_softmax=i % 3 == 0)
    rows[7]["item"] = [1] * 65  # longer than max_item_tokens
    pq.write_table(pa.Table.from_pylist(rows), tmp / "pairs.parquet")
    out = str(tmp / "scores.jsonl")
    return lambda: run_batch(str(tmp / "pairs.parquet"), out, settings(ckpt, 16)), rows


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


def test_jsonl_both_layouts_bit_identical_and_a_killed_engine_loses_nothing(jobs, scorer):
    """JSONL requests and pairs, bad rows, the engine SIGKILLed mid-job: every input row is
    in the output exactly once, in input order, bit-identical to `mis-score score`; Ray
    restarted the actor and retried its batches; nothing compiled after warm-up."""
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
    errors = {g.get("id", g.get("user")): g["error"] for g in got if "error" in g}
    assert errors["bad-long-item"].startswith("items[0]: ")
    assert errors[9].startswith("item: ") and errors["empty"].startswith("items: ")
    assert summary.errors == len(errors)  # the bad JSON line's under None
    scored = [g for g in got if "scores" in g]
    assert summary.items == sum(len(g["scores"]) if "items" in g else 1 for g in scored)
    assert not list(tmp.glob("*.partial-*"))


def test_parquet_requests_to_parquet_bit_identical(jobs, scorer):
    """Parquet requests -> Parquet: id columns kept, scores bit-identical to `mis-score
    score`, bad rows' errors in place; the crashed run's leftover removed."""
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


def test_pairs_one_prefill_per_query_per_engine(jobs, scorer):
    """Each pair's score list is `mis-score score`'s for its one-item request, bit for bit;
    the engine prefilled each query once (prefix misses == queries)."""
    summary, rows, tmp = jobs["pairs"]
    got = [json.loads(line) for line in (tmp / "scores.jsonl").read_text().splitlines()]
    assert len(got) == len(rows) == summary.rows
    for g, row in zip(got, rows, strict=True):
        check_row(g, row, reference(scorer, row))
    assert got[7]["error"].startswith("item: ")
    (eng,) = summary.engines
    # One prefill per query; a query's later batches (and its pairs of the other
    # apply_softmax, one more chunk of the same query) read its cached K/V.
    assert eng["prefix_misses"] == 4 and eng["prefix_hits"] >= 4
    assert summary.items == 47 and eng["compiles_during_job"] == 0


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
