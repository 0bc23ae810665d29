"""The Ray Serve application in-process (real Ray, no mocks) on the tiny checkpoint."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from loadtests.summary import summarize
from mis_api.chunking import split_items
from models.engine import score_ids
from tests.conftest import LABELS, TEST_ENGINE, deployment_of, running_serve, serve_cluster

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

CHUNK, CHUNK_TOKENS = 8, 200  # fanout.chunk_items, fanout.chunk_tokens of the app
SERVED_NAMES = ["Qwen/Qwen3-0.6B", "rerank-v3.5"]  # more names the app answers to
APP = "serve-tests"  # its own name: metrics are read for this application only


@pytest.fixture(scope="module")
def service(ckpts):
    """Base URL of a running app: 2 scorer replicas, prefix mode, chunks of 8 items, the test
    engine's forwards (so one forward packs chunks of several requests)."""
    from serve_app.app import build_graph

    args = {
        "model": {"path": ckpts["qwen3"], "name": "tiny", "served_names": SERVED_NAMES},
        "engine": TEST_ENGINE,
        "fanout": {"chunk_items": CHUNK, "chunk_tokens": CHUNK_TOKENS},
    }
    scorers = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}
    app = build_graph(args, scorer_options=scorers)
    with running_serve((APP, "/", app)) as url:
        yield url


def _post(url, body):
    """POST /v1/score naming this app's deployment: a request that reached another deployment
    on the machine (another test's cluster) is refused (421) instead of answered."""
    headers = {"X-MIS-Deployment": deployment_of(APP)}
    return requests.post(f"{url}/v1/score", json=body, headers=headers, timeout=300)


def _words(rng, n):
    vocab = ["fast", "light", "laptop", "battery", "screen", "cheap", "heavy", "gaming", "red"]
    return " ".join(rng.choice(vocab, n))


@pytest.mark.parametrize("n_items", [1, 7, 500, 1000])
@pytest.mark.parametrize("kind", ["ids", "text"])
def test_http_equals_offline_engine(service, engine, tokenizer, n_items, kind):
    rng = np.random.default_rng(n_items)
    if kind == "ids":
        query = rng.integers(0, 151_000, 30).tolist()
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, 25))).tolist() for _ in range(n_items)
        ]
    else:
        query = _words(rng, 12)
        items = [_words(rng, int(rng.integers(1, 12))) for _ in range(n_items)]
    body = {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": True}
    resp = _post(service, body)
    assert resp.status_code == 200, resp.text
    got = np.array(resp.json()["scores"])
    if kind == "text":
        tok = tokenizer("qwen3")
        query, items = tok.encode(query), tok.encode_batch(items)
    ref = score_ids(engine("qwen3", "prefix"), query, items, LABELS, apply_softmax=True)
    assert got.shape == (n_items, len(LABELS))
    # Bit for bit: chunking, batching with other requests and the prefix cache change nothing.
    assert np.array_equal(got, ref)
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == len(query) + sum(map(len, items))
    assert int(resp.headers["X-MIS-Chunks"]) == len(split_items(items, CHUNK, CHUNK_TOKENS))


def _mixed_bodies(seed: int, n: int) -> list[dict]:
    """Requests of every size the test engine accepts: queries of 1-512 tokens, 1-40 items of
    1-64 tokens, 1-32 labels, some repeating an earlier query."""
    rng = np.random.default_rng(seed)
    bodies: list[dict] = []
    for i in range(n):
        if bodies and i % 4 == 3:
            query = bodies[int(rng.integers(len(bodies)))]["query"]
        else:
            query = rng.integers(0, 151_000, int(rng.choice([1, 9, 60, 200, 512]))).tolist()
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, 65))).tolist()
            for _ in range(int(rng.integers(1, 41)))
        ]
        labels = rng.integers(0, 151_000, int(rng.choice([1, 2, 3, 32]))).tolist()
        bodies.append({"query": query, "items": items, "label_token_ids": labels})
    return bodies


def test_concurrent_requests_get_their_own_scores(service, engine):
    """Mixed sizes, 16 at once over 2 replicas: each answer is bit-identical to scoring its
    request alone offline."""
    bodies = _mixed_bodies(seed=7, n=24)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: _post(service, b), bodies))
    eng = engine("qwen3", "prefix")
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        ref = score_ids(eng, body["query"], body["items"], body["label_token_ids"])
        assert np.array_equal(np.array(resp.json()["scores"]), ref)


def test_a_busy_replica_spills_to_the_other(service):
    """Many one-chunk requests with one query at once: they all prefer one replica, which
    cannot keep up, so the router sends some to the other (affinity never starves a
    replica)."""
    rng = np.random.default_rng(10)
    query = rng.integers(0, 151_000, 50).tolist()
    bodies = [
        {
            "query": query,
            "items": rng.integers(0, 151_000, (CHUNK, 20)).tolist(),
            "label_token_ids": [1],
        }
        for _ in range(96)
    ]
    # 24 at once: the preferred replica's queue passes spill_threshold (4) (under
    # max_inflight_requests, 32: no 503). A machine busy with other tests can starve the
    # ingress so that one burst never queues that deep: up to three bursts.
    used: set[str] = set()
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda b: _post(service, b), bodies))
        assert all(r.ok for r in responses)
        assert {r.headers["X-MIS-Chunks"] for r in responses} == {"1"}
        used |= {r.headers["X-MIS-Replicas"] for r in responses}
        if len(used) == 2:
            break
    assert len(used) == 2, used


def test_a_big_request_is_dealt_over_the_replicas_that_keep_its_query(service):
    """A request of 4 chunks: two on each replica (the query's first two in rendezvous order),
    each replica prefills the query once; the same query again reads it from both caches."""
    rng = np.random.default_rng(11)
    query = rng.integers(0, 151_000, 100).tolist()
    before = _settled()
    for _ in range(2):
        items = rng.integers(0, 151_000, (4 * CHUNK, 5)).tolist()
        resp = _post(service, {"query": query, "items": items, "label_token_ids": LABELS})
        assert resp.ok, resp.text
        assert resp.headers["X-MIS-Chunks"] == "4"
        assert len(resp.headers["X-MIS-Replicas"].split(",")) == 2
    after = _metrics_when(lambda m: m["items scored"] >= before["items scored"] + 8 * CHUNK)
    assert after["prefix misses"] - before["prefix misses"] == 2  # once per replica
    assert after["prefix hits"] - before["prefix hits"] == 6


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"query": [1], "items": [[1, 10**7]], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": "q", "items": [[1]], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": "q", "items": ["a"]}, 400, "label_token_ids"),
        ({"query": [1], "items": [[1]] * 3000, "label_token_ids": [1]}, 400, "items"),
        ({"query": [1], "items": [[1] * 600], "label_token_ids": [1]}, 400, "items[0]"),
        ({"query": [1], "items": [[1]], "label_token_ids": [1], "model": "x"}, 404, "model"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(service, body, code, field):
    resp = _post(service, body)
    assert resp.status_code == code, resp.text
    err = resp.json()
    assert err["object"] == "error" and err["code"] == code and field in err["message"]
    # ...and the service still answers a good request right after.
    assert _post(service, {"query": [1], "items": [[2]], "label_token_ids": [1]}).ok


def test_malformed_json_is_400(service):
    resp = requests.post(
        f"{service}/v1/score",
        data="{oops",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400 and "JSON" in resp.json()["message"]


def test_health_models_and_openapi(service):
    health = requests.get(f"{service}/health", timeout=30)
    assert health.status_code == 200 and health.headers["X-MIS-Deployment"] == deployment_of(APP)
    assert health.json() == {
        "status": "ready",
        "scorer_replicas_ready": 2,
        "model": "tiny",
        "deployment": deployment_of(APP),
    }
    assert requests.get(f"{service}/livez", timeout=30).json() == {"status": "alive"}
    models = requests.get(f"{service}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["random_weights"] is True
    spec = requests.get(f"{service}/openapi.json", timeout=30).json()
    assert {"/v1/score", "/v1/rerank"} <= set(spec["paths"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_the_internet(service, page):
    """Every script, style and icon of the docs pages is served by the app itself."""
    html = requests.get(f"{service}{page}", timeout=30).text
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    assert urls and all(u.startswith("/") for u in urls), urls  # no http(s)://cdn...
    for u in urls:
        resp = requests.get(f"{service}{u}", timeout=30)
        assert resp.status_code == 200 and len(resp.content) > 0, u
    assert "openapi.json" in html


@pytest.mark.browser
def test_swagger_page_renders_in_headless_chromium(service):
    """`bash scripts/test.sh -m browser` (needs Debian's chromium): the page as a browser
    builds it, offline assets and all, lists the scoring operation."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
         "--dump-dom", f"{service}/docs"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "/v1/score" in dom and "/v1/rerank" in dom and "opblock" in dom


def _scrape() -> dict[str, float]:
    """Prometheus text -> {series name with labels: value}, our series only."""
    _, port = serve_cluster()
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_mis_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _total(series: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in (labels | {"application": APP}).items()]
    return sum(
        v for k, v in series.items()
        if k.split("{")[0] == name and all(w in k for w in want)
    )  # fmt: skip


def _read(s: dict[str, float]) -> dict[str, float]:
    return {
        "items scored": _total(s, "ray_mis_items_scored_total"),
        "request items": _total(s, "ray_mis_request_items_total"),
        "tokens": _total(s, "ray_mis_request_tokens_total"),
        "requests": _total(s, "ray_mis_request_latency_s_count", route="score"),
        "chunks": _total(s, "ray_mis_request_chunks_sum"),
        "chunk calls": _total(s, "ray_mis_chunk_latency_s_count"),
        "queue waits": _total(s, "ray_mis_queue_wait_s_count"),
        "prefix hits": _total(s, "ray_mis_prefix_cache_hits_total"),
        "prefix misses": _total(s, "ray_mis_prefix_cache_misses_total"),
        "400s": _total(s, "ray_mis_errors_total", code="400"),
        "compiles": _total(s, "ray_mis_compilations_after_warmup_total"),
    }


def _metrics_when(done, timeout_s: float = 90) -> dict[str, float]:
    """Our metrics once `done(metrics)` holds (Ray exports them every second or so)."""
    deadline = time.time() + timeout_s
    while True:
        now = _read(_scrape())
        if done(now) or time.time() > deadline:
            return now
        time.sleep(1)


def _settled() -> dict[str, float]:
    """Our metrics once every earlier request has been exported: the same in three scrapes 2 s
    apart (a replica starved by other tests on the machine can report one tick late, and a
    stale baseline here counted the previous test's prefix misses in the next one's)."""
    seen, deadline = [_read(_scrape())], time.time() + 120
    while len(seen) < 3 or seen[-1] != seen[-2] or seen[-2] != seen[-3]:
        assert time.time() < deadline, f"metrics still moving after 120 s: {seen[-1]}"
        time.sleep(2)
        seen.append(_read(_scrape()))
    return seen[-1]


def test_metrics_move_after_a_request(service):
    """Scrape Ray's metrics endpoint, send requests, see our counters and histograms move."""
    body = {"query": [5] * 20, "items": [[7] * 9] * 20, "label_token_ids": [9454, 2753]}
    assert _post(service, body).ok  # every series exists from here on
    assert _post(service, {"query": [1]}).status_code == 400
    before = _settled()
    for _ in range(3):
        assert _post(service, body).ok
    assert _post(service, {"query": [1]}).status_code == 400
    after = _metrics_when(
        lambda m: (
            m["requests"] >= before["requests"] + 3
            and m["400s"] > before["400s"]
            and m["items scored"] >= before["items scored"] + 60
        )
    )
    moved = {k: after[k] - before[k] for k in before}
    assert moved["requests"] == 3 and moved["400s"] == 1, moved
    assert moved["items scored"] == moved["request items"] == 60, moved
    assert moved["tokens"] == 3 * (20 + 20 * 9), moved
    assert moved["chunks"] == moved["chunk calls"] == moved["queue waits"] == 9, moved
    assert moved["prefix hits"] + moved["prefix misses"] >= 3, moved
    assert moved["compiles"] == 0, moved


def test_no_compilation_after_ready_under_a_mixed_load(service):
    """Queries of 1-512 tokens, items of 1-64, 1-32 labels, 8 clients at once: the replicas
    compiled every shape before they were ready, so the load compiles nothing."""
    before = _settled()
    bodies = _mixed_bodies(seed=8, n=48)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(r.ok for r in pool.map(lambda b: _post(service, b), bodies))
    n_items = sum(len(b["items"]) for b in bodies)
    after = _metrics_when(
        lambda m: (
            m["items scored"] >= before["items scored"] + n_items
            and m["request items"] >= before["request items"] + n_items
            and m["requests"] >= before["requests"] + 48
        )
    )
    # Both sides: the ingress's count of items asked for and the scorers' count of items
    # scored (a chunk scored twice, or a baseline taken before an earlier test's metrics were
    # in, tells itself apart this way).
    moved = {k: after[k] - before[k] for k in ("items scored", "request items", "requests")}
    assert moved == {"items scored": n_items, "request items": n_items, "requests": 48}, moved
    assert after["compiles"] == 0, after


def test_repeated_query_stays_on_one_replica_and_hits_its_cache(service):
    """Requests repeating a query go to the replica that holds its K/V (query-affinity
    routing): one prefill, then cache hits, one replica."""
    rng = np.random.default_rng(9)
    query = rng.integers(0, 151_000, 100).tolist()
    before = _settled()
    replicas = set()
    for _ in range(6):
        items = rng.integers(0, 151_000, (CHUNK, 5)).tolist()  # one chunk each
        resp = _post(service, {"query": query, "items": items, "label_token_ids": LABELS})
        assert resp.ok, resp.text
        replicas.add(resp.headers["X-MIS-Replicas"])
    after = _metrics_when(lambda m: m["items scored"] >= before["items scored"] + 6 * CHUNK)
    assert len(replicas) == 1, replicas
    assert after["prefix misses"] - before["prefix misses"] == 1
    assert after["prefix hits"] - before["prefix hits"] == 5


def test_locust_headless_against_the_service(service, tmp_path):
    """The load test as shipped: a short headless run with a small workload, 0 failures."""
    repo = Path(__file__).resolve().parents[1]
    locust = Path(sys.executable).with_name("locust")
    env = os.environ | {"MIS_QUERY_TOKENS": "40", "MIS_ITEMS": "24", "MIS_ITEM_TOKENS": "6"}
    subprocess.run(
        [
            str(locust),
            "-f",
            "loadtests/locustfile.py",
            "--headless",
            "--host",
            service,
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "8s",
            # Requests under way at the 8 s mark finish and are counted: on a loaded host the
            # first ones may take longer than the run.
            "--stop-timeout",
            "120",
            "--csv",
            str(tmp_path / "l"),
            "--only-summary",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    s = summarize(str(tmp_path / "l_stats.csv"), items_per_request=24, duration_s=8)
    assert s["requests"] > 0 and s["failures"] == 0 and s["p50_ms"] is not None, s


def _rerank(url, body):
    return requests.post(f"{url}/v1/rerank", json=body, timeout=300)


def test_rerank_equals_scoring_each_prompt(service, engine, tokenizer, record):
    """P(yes) of every document in its Qwen3-Reranker prompt, from one multi-item fan-out,
    equals scoring each full prompt on its own offline; sorted, cut to top_n, with texts."""
    rng = np.random.default_rng(11)
    docs = [_words(rng, int(rng.integers(1, 15))) for _ in range(40)]
    body = {
        "query": "light laptop with a long battery",
        "documents": [d if i % 2 else {"text": d} for i, d in enumerate(docs)],
        "top_n": 7,
        "return_documents": True,
    }
    resp = _rerank(service, body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "rerank" and out["model"] == "tiny"

    tok = tokenizer("qwen3")
    yes_no = [tok.encode("yes")[0], tok.encode("no")[0]]
    q, windows = _prompt_ids(tok, body["query"], docs)
    items = [w for (w,) in windows]
    # One fan-out of all documents, cut as the ingress cuts any request.
    assert int(resp.headers["X-MIS-Chunks"]) == len(split_items(items, CHUNK, CHUNK_TOKENS))
    want = score_ids(engine("qwen3", "serial"), q, items, yes_no, apply_softmax=True)[:, 0]

    results = out["results"]
    assert len(results) == 7
    got = np.array([r["relevance_score"] for r in results])
    assert np.all(np.diff(got) <= 0)  # best first
    chosen = [r["index"] for r in results]
    for r in results:
        assert r["document"]["text"] == docs[r["index"]]
        diff = abs(r["relevance_score"] - want[r["index"]])
        record("rerank via HTTP vs offline serial, P(yes)", diff)
        assert diff <= 1e-5
    rest = np.delete(want, chosen)
    assert want[chosen].min() >= rest.max() - 1e-5  # the best 7, not any 7
    n_tokens = len(q) + sum(map(len, items))
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}


def test_rerank_defaults_and_bad_input(service):
    resp = _rerank(service, {"query": "q", "documents": ["a", "b", "c"]})
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]  # all, no texts by default
    assert all("document" not in r for r in results)
    assert _rerank(service, {"query": "q", "documents": []}).json()["results"] == []
    for body, code, field in [
        ({"query": "q"}, 400, "documents"),
        ({"query": "", "documents": ["a"]}, 400, "query"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ({"query": "q", "documents": [{"txt": "a"}]}, 400, "documents.0"),
        ({"query": "q", "documents": ["a"], "model": "x"}, 404, "model"),
        ({"query": "q", "documents": ["a"] * 3000}, 400, "documents"),
        ({"query": "q", "documents": ["word " * 600], "long_documents": {}}, 400, "documents[0]"),
    ]:
        resp = _rerank(service, body)
        assert resp.status_code == code, (body, resp.text)
        assert field in resp.json()["message"], (field, resp.text)


def test_validate_against_the_live_service(service, ckpts, tmp_path):
    """`mis-score validate` as a user runs it: every check passes on this deployment (exit 0),
    and the same measurements fail against impossible thresholds."""
    from mis_score import validate
    from mis_score.cli import build_parser

    out = tmp_path / "validate.json"
    res = subprocess.run(
        [str(Path(sys.executable).with_name("mis-score")), "validate", "--url", service,
         "--model-path", ckpts["qwen3"], "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| check | measured | threshold | result |" in res.stdout and "PASSED" in res.stdout
    result = json.loads(out.read_text())
    statuses = {c["check"]: c["status"] for c in result["checks"]}
    assert len(statuses) == 6 and set(statuses.values()) == {"pass"}, statuses
    assert result["isolation"] == 0.0  # exact, through HTTP and chunking

    strict = build_parser().parse_args(
        ["validate", "--url", service, "--model-path", ckpts["qwen3"],
         "--equivalence-tol", "-1", "--min-speedup", "1e9", "1", "1"]
    )  # fmt: skip
    measured = {**result, "speedup": {int(n): v for n, v in result["speedup"].items()}}
    judged = validate.judge(measured, strict)
    failed = [c["check"] for c in judged["checks"] if c["status"] == "FAIL"]
    assert not judged["passed"] and len(failed) == 2, judged["checks"]
    assert "FAILED" in validate.markdown(judged)


def test_a_chunk_meant_for_other_settings_is_refused(service, engine):
    """A scorer answers only chunks sent for its own checkpoint and engine settings (the
    ingress sends its scoring key with each call): a call that reaches it for another app, e.g.
    over a reused gRPC port, is refused as Misdelivered, which the ingress retries elsewhere."""
    from ray import serve

    from models.inputs import Chunk
    from serve_app.chunk_call import Misdelivered

    query, items = [5, 6, 7], ((1, 2), (3,))
    chunk = Chunk(tuple(query), items, tuple(LABELS), True)
    scorer = serve.get_deployment_handle("Scorer", app_name=APP)
    with pytest.raises(Misdelivered, match="chunk for key 0123456789abcdef"):
        scorer.score.remote(chunk, key="0123456789abcdef").result()
    got = scorer.score.remote(chunk).result().scores  # no key: a caller of its own
    want = score_ids(
        engine("qwen3", "prefix"), query, [list(i) for i in items], LABELS, apply_softmax=True
    )
    assert np.abs(got - want).max() <= 1e-6


ONE_ITEM = ("Is it light?", "a 1.1 kg ultrabook")  # a query and one item given as a string


def test_python_client_splits_long_item_lists_bit_identically(service):
    """mis_score.client against the live service: 2,100 items against its 2,048-item limit are
    sent as 2 requests, and the merged scores are bit-identical to the server's own answers to
    those requests (blocking and async clients alike); a 4xx is raised with the server's
    message and not retried; a string `items` is one item, as the server reads it."""
    import asyncio

    from mis_score.client import AsyncClient, BadRequestError, Client

    rng = np.random.default_rng(50)
    query = rng.integers(0, 151_000, 20).tolist()
    items = [rng.integers(0, 151_000, int(n)).tolist() for n in rng.integers(1, 6, 2100)]
    direct = [
        _post(service, {"query": query, "items": items[i : i + 2048], "label_token_ids": LABELS})
        for i in range(0, len(items), 2048)
    ]
    assert all(r.ok for r in direct)
    want = np.asarray([row for r in direct for row in r.json()["scores"]])
    query_text, item_text = ONE_ITEM
    single = _post(service, {"query": query_text, "items": item_text, "label_token_ids": LABELS})
    one_item = np.asarray(single.json()["scores"])
    assert one_item.shape == (1, len(LABELS))
    with Client(service, deployment=deployment_of(APP)) as client:
        assert client.limits().max_items_per_request == 2048
        got = client.score(query, items, LABELS)
        assert got.shape == (2100, len(LABELS)) and np.array_equal(got, want)
        with pytest.raises(BadRequestError) as e:
            client.score(query, items[:3], [LABELS[0], LABELS[0]])
        assert e.value.status == 400 and "label_token_ids: must not contain duplicates" in str(
            e.value
        )
        assert client.retries == 0
        # A string `items` is one item, as the server reads it (not one item per character).
        one = client.score(*ONE_ITEM, LABELS)
        assert one.shape == (1, len(LABELS)) and np.array_equal(one, one_item)

    async def run_async():
        async with AsyncClient(service) as client:
            return await client.score(query, items, LABELS), await client.score(*ONE_ITEM, LABELS)

    got, one = asyncio.run(run_async())
    assert np.array_equal(got, want) and np.array_equal(one, one_item)


QUERY = "Which laptop is good for long flights?"
DOCS = ["Ultrabook, 1.1 kg, 14 hours of battery.", "Gaming laptop, 3.2 kg.", "A paperback novel."]


OTHER = "A gift for a reader?"


def _prompt_ids(tok, query: str, docs: list[str], instruction=None, cut=None):
    """The rerank prompt's token ids from the templates' text, as a user builds them: the
    query part, and per document its windows, each `document template` filled: whole, or
    (`cut`: own token ids -> the pieces kept) the document's own tokens (`" " + text`) cut
    and the template's end after each piece."""
    from serve_app.config import RerankArgs

    args = RerankArgs()
    filled = args.query_template.replace("{instruction}", instruction or args.instruction)
    before, after = args.document_template.split("{document}")
    if cut is None:
        items = [[tok.encode(args.document_template.replace("{document}", d))] for d in docs]
    else:
        items = [[w + tok.encode(after) for w in cut(tok.encode(before + d))] for d in docs]
    return tok.encode(filled.replace("{query}", query)), items


def _offline_relevance(engine, tokenizer, query: str, docs: list[str], **prompt) -> np.ndarray:
    """(P(yes), P(no)) of each document in the rerank prompt (_prompt_ids; a document cut
    into windows: its best window's), scored by the offline engine in serial mode (each
    prompt on its own; the service runs prefix mode)."""
    tok = tokenizer("qwen3")
    labels = [tok.encode("yes")[0], tok.encode("no")[0]]
    q, windows = _prompt_ids(tok, query, docs, **prompt)
    flat = [w for ws in windows for w in ws]
    scores = score_ids(engine("qwen3", "serial"), q, flat, labels, apply_softmax=True)
    out, at = [], 0
    for ws in windows:
        rows = scores[at : at + len(ws)]
        out.append(rows[int(np.argmax(rows[:, 0]))])
        at += len(ws)
    return np.array(out)


def _close(got, want, record, what: str) -> None:
    """Within the float32 equivalence bound of the offline engine's scores (recorded)."""
    diff = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want)).max())
    record(f"{what} vs offline serial", diff)
    assert diff <= 1e-5, (what, diff)


def _ranked(results: list[tuple[int, float]], want: np.ndarray, top_n: int, record, what: str):
    """Best first, cut to top_n, each score the engine's P(yes) for that document (within the
    bound), and the best top_n of the engine's (up to the bound)."""
    assert len(results) == top_n, results
    index = [i for i, _ in results]
    scores = [score for _, score in results]
    assert np.all(np.diff(scores) <= 0), scores
    _close(scores, want[index], record, what)
    rest = np.delete(want, index)
    assert rest.size == 0 or want[index].min() >= rest.max() - 1e-5


def test_cohere_sdk_v1_and_v2_clients_rerank_as_the_engine(service, engine, tokenizer, record):
    """The Cohere SDK's own clients: v1 (`Client.rerank` -> /v1/rerank) and v2
    (`ClientV2.rerank` -> /v2/rerank, `model` required: a served name) get the offline
    engine's P(yes) of each document, sorted and cut to top_n."""
    import cohere

    want = _offline_relevance(engine, tokenizer, QUERY, DOCS)[:, 0]
    v2 = cohere.ClientV2(api_key="unused", base_url=service)
    got = v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=2)
    _ranked([(r.index, r.relevance_score) for r in got.results], want, 2, record, "Cohere v2")
    v1 = cohere.Client(api_key="unused", base_url=service)
    got1 = v1.rerank(model="tiny", query=QUERY, documents=DOCS)
    _ranked([(r.index, r.relevance_score) for r in got1.results], want, 3, record, "Cohere v1")


def test_vllm_score_api_scores_pairs_as_the_engine(service, engine, tokenizer, record):
    """vLLM's score API at /score and (told apart by its fields) at /v1/score: 1:1, 1:N, N:N
    and queries/documents; each score is the offline engine's P(yes) for that pair in the
    rerank prompt."""
    want = _offline_relevance(engine, tokenizer, QUERY, DOCS)[:, 0]
    other = _offline_relevance(engine, tokenizer, OTHER, DOCS)[:, 0]
    cases = [
        ({"text_1": QUERY, "text_2": DOCS[1]}, [want[1]]),
        ({"text_1": QUERY, "text_2": DOCS}, want),
        ({"queries": QUERY, "documents": DOCS}, want),
        ({"text_1": [QUERY, OTHER], "text_2": DOCS[:2]}, [want[0], other[1]]),
    ]
    for path in ("/score", "/v1/score"):
        for body, scores in cases:
            r = requests.post(f"{service}{path}", json={"model": "tiny", **body}, timeout=60)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["object"] == "list" and out["model"] == "tiny" and out["id"]
            assert [d["index"] for d in out["data"]] == list(range(len(scores)))
            _close([d["score"] for d in out["data"]], scores, record, "vLLM score")
            assert out["usage"]["prompt_tokens"] > 0


def test_tei_and_jina_rerank_shapes(service, engine, tokenizer, record):
    """/rerank: TEI's shape (`texts`) gives [{index, score, text?}] best first, the score the
    offline engine's P(yes) (raw_scores: its logit log(P(yes)/P(no)), whose sigmoid is
    P(yes)); vLLM/Jina's shape (`documents`) is /v1/rerank's answer, the engine's P(yes)."""
    want = _offline_relevance(engine, tokenizer, QUERY, DOCS)[:, 0]
    r = requests.post(f"{service}/rerank", json={"query": QUERY, "texts": DOCS}, timeout=60)
    assert r.status_code == 200, r.text
    assert all(set(x) == {"index", "score"} for x in r.json()), r.text
    _ranked([(x["index"], x["score"]) for x in r.json()], want, 3, record, "TEI")
    body = {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    raw = requests.post(f"{service}/rerank", json=body, timeout=60).json()
    assert [x["text"] for x in raw] == [DOCS[x["index"]] for x in raw]
    p_yes = [1 / (1 + np.exp(-x["score"])) for x in raw]
    _ranked([(x["index"], p) for x, p in zip(raw, p_yes, strict=True)], want, 3, record, "TEI raw")
    jina = requests.post(f"{service}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60)
    results = [(x["index"], x["relevance_score"]) for x in jina.json()["results"]]
    _ranked(results, want, 3, record, "Jina")


LONG = "word " * 80  # one document over the test engine's max_item_tokens (64)


def _over_the_limit(message: str, field: str) -> bool:
    return message.startswith(f"{field}: ") and "exceed max_item_tokens=64" in message


def test_cohere_sdk_gets_errors_as_cohere_answers_them(service):
    """/v2/rerank answers errors as Cohere does, a body of `message` alone with Cohere's
    status: the SDK raises its own classes (BadRequestError, NotFoundError) with that body.
    /v1/rerank (the v1 client's) answers ours, whose `message` the v1 SDK reads as well."""
    import cohere

    v2 = cohere.ClientV2(api_key="unused", base_url=service)
    with pytest.raises(cohere.errors.BadRequestError) as e:
        v2.rerank(model="tiny", query=QUERY, documents=DOCS, max_tokens_per_doc=0)
    assert set(e.value.body) == {"message"}, e.value.body
    assert e.value.body["message"].startswith("max_tokens_per_doc: "), e.value.body
    with pytest.raises(cohere.errors.NotFoundError) as e:
        v2.rerank(model="not-served", query=QUERY, documents=DOCS)
    assert set(e.value.body) == {"message"}, e.value.body
    assert e.value.body["message"].startswith("model: unknown model 'not-served'")
    v1 = cohere.Client(api_key="unused", base_url=service)
    with pytest.raises(cohere.errors.BadRequestError) as e:
        v1.rerank(model="tiny", query=QUERY, documents=DOCS, max_chunks_per_doc=0)
    assert e.value.body["message"].startswith("max_chunks_per_doc: "), e.value.body


def _vllm_error(r: requests.Response, status: int, param: str) -> str:
    """The message of a vLLM error answer (its ErrorResponse), checked whole."""
    assert r.status_code == status, r.text
    (info,) = r.json().values()
    assert r.json() == {"error": info}, r.text
    assert info["type"] == "BadRequestError" and info["code"] == status, r.text
    assert info["param"] == param and info["message"].startswith(f"{param}: "), r.text
    return info["message"]


def test_vllm_score_errors_name_the_request_fields(service):
    """vLLM's score API answers vLLM's ErrorResponse; a document is named by its index in
    text_2 / documents (pairs with one query are scored together, but an error names the
    pair, not the document's place in its query's group), and a queries/documents request
    is told about its own fields."""
    # Pairs 1 and 2 share a query: LONG is the second document of that query's group.
    queries = [QUERY, OTHER, OTHER, QUERY]
    docs = [DOCS[0], DOCS[1], LONG, DOCS[2]]
    for path in ("/score", "/v1/score"):
        r = requests.post(f"{service}{path}", json={"text_1": queries, "text_2": docs}, timeout=60)
        assert _over_the_limit(_vllm_error(r, 400, "text_2[2]"), "text_2[2]"), r.text
        body = {"queries": queries, "documents": docs}
        r = requests.post(f"{service}{path}", json=body, timeout=60)
        assert _over_the_limit(_vllm_error(r, 400, "documents[2]"), "documents[2]"), r.text
    body = {"queries": [QUERY] * 3, "documents": DOCS[:2]}
    r = requests.post(f"{service}/score", json=body, timeout=60)
    message = _vllm_error(r, 400, "queries")
    assert (
        message == "queries: 3 texts for 2 in documents; give one, or as many as documents (pairs)"
    )
    r = requests.post(f"{service}/score", json={"queries": QUERY}, timeout=60)
    assert _vllm_error(r, 400, "documents") == "documents: missing (give it with queries)"
    # vLLM's and Jina's /rerank (documents) answers as vLLM too.
    r = requests.post(f"{service}/rerank", json={"query": QUERY, "documents": [LONG]}, timeout=60)
    assert _over_the_limit(_vllm_error(r, 400, "documents[0]"), "documents[0]"), r.text


def test_tei_rerank_errors_as_tei_answers_them(service):
    """TEI's /rerank (texts) answers TEI's ErrorResponse {error, error_type} with TEI's status
    per type: an input over the limit 413 Validation, a body it cannot read 422."""
    body = {"query": QUERY, "texts": [DOCS[0], LONG]}
    r = requests.post(f"{service}/rerank", json=body, timeout=60)
    assert r.status_code == 413 and set(r.json()) == {"error", "error_type"}, r.text
    assert r.json()["error_type"] == "Validation" and _over_the_limit(r.json()["error"], "texts[1]")
    r = requests.post(f"{service}/rerank", json={"query": QUERY, "texts": "x"}, timeout=60)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation", r.text
    assert r.json()["error"].startswith("texts: ") and set(r.json()) == {"error", "error_type"}
    headers = {"content-type": "application/json"}
    r = requests.post(f"{service}/rerank", data="{oops", headers=headers, timeout=60)
    assert r.status_code == 422 and r.json()["error"].startswith("body: invalid JSON"), r.text


# A short document, a long one, and one a token over the limit (64 with the template's end).
LONG_DOCS = [
    DOCS[0],
    " ".join(f"w{i}" for i in range(90)),
    "Battery: " + "long lasting and light, " * 10 + "and so much more",
]


def _own_budget(tokenizer) -> int:
    """A document's own tokens an item of the test engine holds: 64 less the template's end."""
    from serve_app.config import RerankArgs

    after = RerankArgs().document_template.split("{document}")[1]
    return 64 - len(tokenizer("qwen3").encode(after))


def test_long_documents_are_cut_as_each_protocol_says(service, engine, tokenizer, record):
    """Each client's own truncation option cuts the document's tokens, never the query nor
    the template's end, and the scores are the offline engine's on the prompt cut by hand:
    TEI `truncate` (Right keeps the start, Left the end), Cohere v2 `max_tokens_per_doc` (its
    default 4096 capped at the server's limit; LangChain's CohereRerank through the Cohere v2
    SDK), vLLM `truncate_prompt_tokens` (the whole prompt; -1: the server's limit)."""
    import cohere
    from langchain_cohere import CohereRerank

    budget = _own_budget(tokenizer)
    assert len(tokenizer("qwen3").encode(" " + LONG_DOCS[2])) == budget + 1
    right = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=lambda d: [d[:budget]])
    left = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=lambda d: [d[-budget:]])
    assert np.abs(right[:, 0] - left[:, 0]).max() > 1e-3  # the two cuts differ
    for direction, want in (("Right", right), ("Left", left)):
        body = {"query": QUERY, "texts": LONG_DOCS, "truncate": True}
        body |= {"truncation_direction": direction}
        r = requests.post(f"{service}/rerank", json=body, timeout=60)
        assert r.status_code == 200, r.text
        _ranked([(x["index"], x["score"]) for x in r.json()], want[:, 0], 3, record, "TEI cut")

    v2 = cohere.ClientV2(api_key="unused", base_url=service)
    got = v2.rerank(model="tiny", query=QUERY, documents=LONG_DOCS)
    _ranked([(x.index, x.relevance_score) for x in got.results], right[:, 0], 3, record, "v2 cut")
    short = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=lambda d: [d[:12]])
    got = v2.rerank(model="tiny", query=QUERY, documents=LONG_DOCS, max_tokens_per_doc=12)
    q12, w12 = _prompt_ids(tokenizer("qwen3"), QUERY, LONG_DOCS, cut=lambda d: [d[:12]])
    assert got.meta.tokens.input_tokens == len(q12) + sum(len(w) for (w,) in w12)  # as scored
    _ranked([(x.index, x.relevance_score) for x in got.results], short[:, 0], 3, record, "v2 12")
    lc = CohereRerank(client=v2, model="tiny", top_n=3)
    docs = lc.rerank(LONG_DOCS, QUERY, max_tokens_per_doc=12)
    _ranked([(x["index"], x["relevance_score"]) for x in docs], short[:, 0], 3, record, "LangChain")

    q_len = len(_prompt_ids(tokenizer("qwen3"), QUERY, [])[0])
    suffix = 64 - budget
    k = q_len + suffix + 20  # the whole prompt: the query part, 20 document tokens, the end
    cut20 = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=lambda d: [d[:20]])
    for truncate, want in ((k, cut20), (-1, right)):
        body = {"text_1": QUERY, "text_2": LONG_DOCS, "truncate_prompt_tokens": truncate}
        r = requests.post(f"{service}/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        _close([d["score"] for d in r.json()["data"]], want[:, 0], record, "vLLM cut")
        body = {"query": QUERY, "documents": LONG_DOCS, "truncate_prompt_tokens": truncate}
        r = requests.post(f"{service}/rerank", json=body, timeout=60)
        assert r.status_code == 200, r.text
        results = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
        _ranked(results, want[:, 0], 3, record, "vLLM rerank cut")
    body = {"text_1": QUERY, "text_2": LONG_DOCS, "truncate_prompt_tokens": 10**6}
    r = requests.post(f"{service}/score", json=body, timeout=60)
    assert _vllm_error(r, 400, "truncate_prompt_tokens")
    body["truncate_prompt_tokens"] = q_len
    r = requests.post(f"{service}/score", json=body, timeout=60)
    assert "leaves no room" in _vllm_error(r, 400, "truncate_prompt_tokens")


def test_v1_rerank_scores_a_long_document_as_its_best_window(service, engine, tokenizer, record):
    """/v1/rerank gives a document over the limit Cohere v1's meaning: windows of the limit
    (up to max_chunks_per_doc, default 10), its score the best window's, each window scored
    exactly as alone; one window allowed is the right-truncated document. `long_documents`
    sets windows and overlap; `instruction` (or SGLang's `instruct`) replaces the prompt's."""
    budget = _own_budget(tokenizer)

    def windows(size, overlap=0, most=10):
        def cut(d):  # from the start, the last window ending at the document's end
            starts = list(range(0, max(len(d) - overlap, 1), size - overlap))[:most]
            if starts[-1] + size >= len(d):
                starts[-1] = max(len(d) - size, 0)
            return [d[s : s + size] for s in starts]

        return cut

    want = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=windows(budget))
    r = _rerank(service, {"query": QUERY, "documents": LONG_DOCS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    _ranked([(x["index"], x["relevance_score"]) for x in results], want[:, 0], 3, record, "v1")
    tok = tokenizer("qwen3")
    counts = [len(ws) for ws in _prompt_ids(tok, QUERY, LONG_DOCS, cut=windows(budget))[1]]
    assert counts[0] == 1 and counts[1] > 1
    assert {x["index"]: x["windows"] for x in results} == dict(enumerate(counts))

    cut = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=lambda d: [d[:budget]])
    r = _rerank(service, {"query": QUERY, "documents": LONG_DOCS, "max_chunks_per_doc": 1})
    results = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
    _ranked(results, cut[:, 0], 3, record, "v1 one window")

    small = windows(16, 4, 5)
    want = _offline_relevance(engine, tokenizer, QUERY, LONG_DOCS, cut=small)
    body = {
        "query": QUERY,
        "documents": LONG_DOCS,
        "long_documents": {"mode": "chunk", "max_tokens": 16, "overlap": 4, "max_chunks": 5},
    }
    r = _rerank(service, body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    _ranked([(x["index"], x["relevance_score"]) for x in results], want[:, 0], 3, record, "16/4")
    assert sorted(x["windows"] for x in results) == sorted(
        len(ws) for ws in _prompt_ids(tok, QUERY, LONG_DOCS, cut=small)[1]
    )

    task = "Given a question about travel, find products that help"
    want = _offline_relevance(engine, tokenizer, QUERY, DOCS, instruction=task)
    for name in ("instruction", "instruct"):
        r = _rerank(service, {"query": QUERY, "documents": DOCS, name: task})
        results = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
        _ranked(results, want[:, 0], 3, record, "instruction")
    for bad, field in (
        ({"long_documents": {"mode": "chunk", "overlap": budget}}, "long_documents.overlap"),
        ({"long_documents": {"mode": "chunk", "max_chunks": 65}}, "long_documents.max_chunks"),
        ({"max_chunks_per_doc": 2, "truncate_prompt_tokens": 50}, "truncate_prompt_tokens"),
        ({"instruction": "a", "instruct": "b"}, "instruct"),
    ):
        r = _rerank(service, {"query": QUERY, "documents": LONG_DOCS} | bad)
        assert r.status_code == 400 and r.json()["message"].startswith(f"{field}"), r.text


def test_score_batch_answers_each_entry_as_alone(service):
    """/v1/score/batch: good and bad entries mixed, answered in order, each good one
    bit-identical to its own /v1/score answer and each bad one the error body /v1/score gives
    it; past max_items_per_batch the whole batch is a 400 naming the limit."""
    bodies = _mixed_bodies(seed=21, n=6)
    bad = [
        {"query": [1], "items": [[2]], "label_token_ids": [3, 3]},
        {"query": [1], "items": [[2]]},
        {"query": [1], "items": [[2]], "label_token_ids": [3], "model": "nope"},
    ]
    entries = [bodies[0], bad[0], bodies[1], bodies[2], bad[1], bodies[3], bad[2], *bodies[4:]]
    alone = [_post(service, b) for b in entries]
    r = requests.post(f"{service}/v1/score/batch", json={"requests": entries}, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()["responses"]
    assert len(got) == len(entries)
    for one, batched in zip(alone, got, strict=True):
        assert batched == one.json(), (batched, one.text)
    assert [x.get("object") for x in got].count("error") == 3
    from mis_score.client import Client, MisServeError

    with Client(service) as client:
        results = client.score_batch(entries)
    for one, result in zip(alone, results, strict=True):
        if one.ok:
            assert np.array_equal(result, np.asarray(one.json()["scores"]))
        else:
            assert isinstance(result, MisServeError) and result.status == one.status_code
            assert result.message == one.json()["message"]
    too_many = {"requests": [{"query": [1], "items": [[2]] * 2048, "label_token_ids": [3]}] * 9}
    r = requests.post(f"{service}/v1/score/batch", json=too_many, timeout=60)
    assert r.status_code == 400 and "max_items_per_batch=16384" in r.json()["message"]


def test_served_names(service):
    """model.served_names: every name is accepted and listed; any other is a 404 that lists
    what is served."""
    models = requests.get(f"{service}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny", *SERVED_NAMES]
    body = {"query": [5, 6], "items": [[7]], "label_token_ids": LABELS}
    want = _post(service, body).json()["scores"]
    for name in SERVED_NAMES:
        r = _post(service, body | {"model": name})
        assert r.status_code == 200 and r.json()["scores"] == want and r.json()["model"] == name
    r = _post(service, body | {"model": "Qwen/Qwen3-8B"})
    assert r.status_code == 404 and "rerank-v3.5" in r.json()["message"]


def _loads_jax(deployment: str) -> list[bool]:
    """For each live replica of this app's `deployment` on the session's cluster (its actors as
    the GCS lists them, by pid), whether jaxlib is mapped in the process."""
    from ray._private.state import actors  # the public state API needs the dashboard

    found = []
    for actor in actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == f"ServeReplica:{APP}:{deployment}":
            try:
                with open(f"/proc/{actor['Pid']}/maps") as maps:
                    found.append("/jaxlib/" in maps.read())
            except OSError:  # it exited after the listing: not a live replica
                pass
    return found


def test_the_ingress_never_loads_jax(service):
    """After every request shape above (this test runs last in the module; alone, it checks one
    request), the ingress replica has no JAX: it unpickles the scorers' answers
    (serve_app/chunk_call.py), and a class from scorer.py would have imported the engine. The
    scorers, as a check of the check, have it."""
    assert _post(service, {"query": [5], "items": [[6]], "label_token_ids": LABELS}).ok
    assert _loads_jax("ScoreIngress") == [False]
    scorers = _loads_jax("Scorer")
    assert scorers and all(scorers), scorers
