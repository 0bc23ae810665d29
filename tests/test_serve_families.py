"""The service on other families and heads (real Ray Serve, checkpoints written by HF
transformers): a Gemma 2 causal LM and a Qwen3 sequence classifier answer /v1/score and
/v1/rerank through HTTP as the offline engine scores the same requests; a Qwen3 with LoRA
adapters written by peft answers each request with the adapter its `model` names, and the
classifier's adapter with its own head of other classes answers with them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import requests

from models.engine import EngineConfig, ScoringEngine
from serve_app.config import RerankArgs
from serve_app.rerank import label_ids
from tests.conftest import LABELS, REPO, random_request, replica_logs, running_serve
from tests.hf_families import write_adapter, write_cls_adapter, write_with_transformers

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

ENGINE = {"max_batch_tokens": 1024, "max_item_tokens": 64, "max_query_tokens": 256}
QUERY = "Which laptop is good for long flights?"
DOCS = ["Ultrabook, 1.1 kg, 14 hours of battery.", "Gaming laptop, 3.2 kg.", "A novel."]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-families")
    out = {
        name: write_with_transformers(name, root / name, seed=7)
        for name in ("gemma2-tiny", "qwen3-tiny-cls", "qwen3-tiny")
    }
    base = out["qwen3-tiny"]
    out |= {
        "lora-a": write_adapter(base, root / "lora-a", seed=1),
        "lora-b": write_adapter(base, root / "lora-b", seed=2, r=4, target_modules=["v_proj"]),
    }
    # The classifier retrained with 2 classes: LoRA and its own head (peft's modules_to_save);
    # the LM turned into a 2-class classifier by its adapter.
    cls = out["qwen3-tiny-cls"]
    out["cls-two"] = write_cls_adapter(cls, root / "cls-two", 3, num_labels=2, task_type="SEQ_CLS")
    out["lm-cls"] = write_cls_adapter(base, root / "lm-cls", 4, num_labels=2, task_type="SEQ_CLS")
    # Added at run time (the ingress's user_config): two, and one that is no adapter.
    out["lora-c"] = write_adapter(base, root / "lora-c", seed=5)
    out["lora-d"] = write_adapter(base, root / "lora-d", seed=6, r=4)
    (root / "not-an-adapter").mkdir()
    out["not-an-adapter"] = str(root / "not-an-adapter")
    return out


ADAPTERS = ("lora-a", "lora-b")  # and "lm-cls", the LM's classifier adapter


@pytest.fixture(scope="module")
def service(models):
    from serve_app.app import build_graph

    def app(path: str, **args):
        return build_graph(
            {"model": {"path": path}, "engine": ENGINE, **args},
            scorer_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            ingress_options={"ray_actor_options": {"num_cpus": 0.1}},
        )

    apps = [("gemma2", "/gemma2", app(models["gemma2-tiny"]))]
    cls = models["qwen3-tiny-cls"]
    cls_adapter = {"path": cls, "adapters": {"cls-two": models["cls-two"]}}
    apps.append(("cls", "/cls", app(cls, model=cls_adapter, warmup=False)))
    from ray import serve

    with running_serve(*apps) as url:
        _deploy_lora(models, {})  # as `serve deploy` does: its user_config changes in place
        try:
            deadline = time.monotonic() + 600
            while serve.status().applications["lora"].status != "RUNNING":
                assert time.monotonic() < deadline, serve.status().applications["lora"]
                time.sleep(1)
            yield url
        finally:
            serve.delete("lora")


def _deploy_lora(models, runtime: dict[str, str] | list[str], **settings) -> None:
    """The "lora" app (LoRA adapters of the Qwen3 LM) deployed from a config, as `serve
    deploy` does, with `runtime` as the adapters of its ingress's user_config (a list: one of
    the wrong shape) and its other `settings`: deployed again with only those changed, no
    replica restarts."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    adapters = {name: models[name] for name in (*ADAPTERS, "lm-cls")}
    app = {
        "name": "lora",
        "route_prefix": "/lora",
        "import_path": "serve_app.app:build_app",
        "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}},
        # Compiled on first use: its requests need a few shapes, not the whole warm-up.
        "args": {
            "model": {"path": models["qwen3-tiny"], "adapters": adapters},
            "engine": ENGINE,
            "warmup": False,
        },
        "deployments": [
            {"name": "Scorer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            {
                "name": "ScoreIngress",
                "ray_actor_options": {"num_cpus": 0.1},
                "user_config": {"adapters": runtime, **settings},
            },
        ],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def _engine(path: str) -> ScoringEngine:
    return ScoringEngine(path, EngineConfig(**ENGINE))


def _rerank_request(engine: ScoringEngine, path: str):
    """The prompt /v1/rerank scores (the default templates), built from the templates' text."""
    from models.tokenizer import TextTokenizer

    tok = TextTokenizer.from_model_dir(path)
    args = RerankArgs()
    query = args.query_template.replace("{instruction}", args.instruction)
    docs = [args.document_template.replace("{document}", d) for d in DOCS]
    return tok.encode(query.replace("{query}", QUERY)), [tok.encode(d) for d in docs]


def _score(engine: ScoringEngine, query, items, labels, soft: bool) -> np.ndarray:
    from models.inputs import Chunk

    chunk = Chunk(tuple(query), tuple(map(tuple, items)), tuple(labels), soft)
    (out,) = engine.score([chunk])
    return out


def test_gemma2_answers_score_and_rerank_as_the_engine(service, models):
    path = models["gemma2-tiny"]
    engine = _engine(path)
    query, items = random_request(seed=3, n_items=20, q_len=40)
    for soft in (True, False):
        body = {"query": query, "items": items, "label_token_ids": LABELS, "apply_softmax": soft}
        r = requests.post(f"{service}/gemma2/v1/score", json=body, timeout=120)
        assert r.status_code == 200, r.text
        want = _score(engine, query, items, LABELS, soft)
        assert np.abs(np.asarray(r.json()["scores"]) - want).max() <= 1e-6
    q, docs = _rerank_request(engine, path)
    want = _score(engine, q, docs, label_ids_of(path), True)[:, 0]
    r = requests.post(f"{service}/gemma2/v1/rerank", json={"query": QUERY, "documents": DOCS})
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert np.abs(np.array([got[i] for i in range(3)]) - want).max() <= 1e-6
    r = requests.post(f"{service}/gemma2/v1/score", json={"query": query, "items": items[:2]})
    assert r.status_code == 400 and r.json()["message"] == "label_token_ids: must not be empty"
    card = requests.get(f"{service}/gemma2/v1/models", timeout=30).json()["data"][0]
    assert card["head"] == "lm" and "class_labels" not in card


def label_ids_of(path: str) -> tuple[int, int]:
    from models.tokenizer import TextTokenizer

    return label_ids(TextTokenizer.from_model_dir(path).encode, ("yes", "no"))


def test_classification_model_answers_class_scores_and_rerank(service, models):
    """No label_token_ids: each item's class probabilities (apply_softmax) or raw class
    logits; sending label ids is a 400 that says why; /v1/rerank ranks by the last class's
    probability; /v1/models names the head and its classes."""
    path = models["qwen3-tiny-cls"]
    engine = _engine(path)
    query, items = random_request(seed=4, n_items=12, q_len=30)
    for soft in (True, False):
        body = {"query": query, "items": items, "apply_softmax": soft}
        r = requests.post(f"{service}/cls/v1/score", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["scores"])
        want = _score(engine, query, items, (), soft)
        assert got.shape == (12, 3) and np.abs(got - want).max() <= 1e-6
        if soft:
            assert np.allclose(got.sum(axis=1), 1.0)
    r = requests.post(
        f"{service}/cls/v1/score", json={"query": query, "items": items, "label_token_ids": [1]}
    )
    assert r.status_code == 400, r.text
    assert r.json()["message"].startswith("label_token_ids: this model has a classification head")
    card = requests.get(f"{service}/cls/v1/models", timeout=30).json()["data"][0]
    assert card["head"] == "classification"
    assert card["class_labels"] == ["negative", "neutral", "positive"]
    q, docs = _rerank_request(engine, path)
    want = _score(engine, q, docs, (), True)[:, -1]
    r = requests.post(f"{service}/cls/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert np.abs(np.array([got[i] for i in range(3)]) - want).max() <= 1e-6


def test_classifier_adapter_with_its_own_head(service, models):
    """The adapter's own head of 2 classes (the base has 3): its requests answer 2 class
    scores as the offline engine with the adapter gives them (the base's, 3, beside them),
    /v1/models lists its classes, and /v1/rerank with it ranks by its last class."""
    from models.inputs import Chunk

    path, adapters = models["qwen3-tiny-cls"], {"cls-two": models["cls-two"]}
    engine = ScoringEngine(path, EngineConfig(**ENGINE, max_adapters=1), adapters)
    query, items = random_request(seed=5, n_items=12, q_len=30)
    for model, classes in (("cls-two", 2), (None, 3)):
        body = {"query": query, "items": items, "apply_softmax": True, "model": model}
        r = requests.post(f"{service}/cls/v1/score", json=body, timeout=120)
        assert r.status_code == 200, r.text
        chunk = Chunk(tuple(query), tuple(map(tuple, items)), (), True, adapter=model)
        (want,) = engine.score([chunk])
        got = np.asarray(r.json()["scores"])
        assert got.shape == (12, classes) and np.abs(got - want).max() <= 1e-6, model
    cards = {
        c["id"]: c for c in requests.get(f"{service}/cls/v1/models", timeout=30).json()["data"]
    }
    assert cards["cls-two"]["class_labels"] == ["LABEL_0", "LABEL_1"]
    assert cards["cls-two"]["head"] == "classification" and cards["cls-two"]["parent"] != "cls-two"
    q, docs = _rerank_request(engine, path)
    chunk = Chunk(tuple(q), tuple(map(tuple, docs)), (), True, adapter="cls-two")
    (want,) = engine.score([chunk])
    rerank = {"query": QUERY, "documents": DOCS, "model": "cls-two"}
    r = requests.post(f"{service}/cls/v1/rerank", json=rerank, timeout=120)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert np.abs(np.array([got[i] for i in range(3)]) - want[:, -1]).max() <= 1e-6


def test_lora_adapters_per_request_as_the_engine_scores_each_alone(service, models):
    """Concurrent requests for two adapters, the LM's classifier adapter and the base (their
    chunks share forwards on the one replica) each bit-identical to the offline engine scoring
    it alone with its adapter (the classifier adapter's: its 2 class logits, no label ids);
    /v1/rerank picks one by `model` too; /v1/models lists them with their heads; an unknown
    name is a 404 listing what is served."""
    import concurrent.futures

    from models.inputs import Chunk

    url = f"{service}/lora"
    served = (*ADAPTERS, "lm-cls")
    adapters = {name: models[name] for name in served}
    engine = ScoringEngine(models["qwen3-tiny"], EngineConfig(**ENGINE, max_adapters=3), adapters)
    names = [None, *served] * 2
    bodies = []
    for i, name in enumerate(names):
        query, items = random_request(seed=40 + i // 4, n_items=7, q_len=30)  # each under all 4
        bodies.append({"query": query, "items": items})
        if name != "lm-cls":  # a classification head reads no label ids
            bodies[-1]["label_token_ids"] = LABELS
        if name is not None:
            bodies[-1]["model"] = name
    post = lambda b: requests.post(f"{url}/v1/score", json=b, timeout=120)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, bodies))
    for name, body, r in zip(names, bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        query, items = tuple(body["query"]), tuple(map(tuple, body["items"]))
        labels = tuple(body.get("label_token_ids", ()))
        (want,) = engine.score([Chunk(query, items, labels, adapter=name)])
        assert np.array_equal(np.asarray(r.json()["scores"]), want), name
    assert np.asarray(answers[3].json()["scores"]).shape == (7, 2)
    # The same query under the base and each LoRA adapter: different scores (it matters).
    for i in (1, 2):
        assert (
            np.abs(np.log(answers[0].json()["scores"]) - np.log(answers[i].json()["scores"])).max()
            > 0.1
        )
    r = requests.post(f"{url}/v1/score", json={**bodies[3], "label_token_ids": LABELS})
    assert r.status_code == 400, r.text
    assert r.json()["message"].startswith("label_token_ids: this model has a classification head")
    listed = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed][1:] == list(served)
    assert all(m["parent"] == listed[0]["id"] for m in listed[1:])
    assert [m["head"] for m in listed] == ["lm", "lm", "lm", "classification"]
    assert listed[-1]["class_labels"] == ["LABEL_0", "LABEL_1"]
    # The classifier adapter reranks by its last class's probability (rerank.class_index).
    q, docs = _rerank_request(engine, models["qwen3-tiny"])
    (want,) = engine.score([Chunk(tuple(q), tuple(map(tuple, docs)), (), True, adapter="lm-cls")])
    rerank = {"query": QUERY, "documents": DOCS, "model": "lm-cls"}
    r = requests.post(f"{url}/v1/rerank", json=rerank, timeout=120)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert np.abs(np.array([got[i] for i in range(3)]) - want[:, -1]).max() <= 1e-6
    rerank = {"query": QUERY, "documents": DOCS, "model": "lora-b"}
    r = requests.post(f"{url}/v1/rerank", json=rerank, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "lora-b", r.text
    base = requests.post(f"{url}/v1/rerank", json={**rerank, "model": None}, timeout=120)
    assert base.json()["results"] != r.json()["results"]
    r = requests.post(f"{url}/v1/score", json={**bodies[0], "model": "lora-c"}, timeout=30)
    assert r.status_code == 404, r.text
    assert "'lora-c'" in r.json()["message"]
    assert "['lora-a', 'lora-b', 'lm-cls']" in r.json()["message"]


def test_adapters_added_repointed_and_removed_at_run_time_without_a_restart(
    service, models, tmp_path
):
    """The ingress's user_config deployed again with other adapters: the scorer replica is not
    restarted; a new adapter's first requests get a 503 with Retry-After while the replica
    reads it, then its scores are bit-identical to the offline engine's with it; a name
    pointed at another directory scores with the new weights (no K/V cached under the old
    ones is read); a directory that is no adapter is refused and named in its 404 while the
    rest are served; files rewritten after the ingress checked them are refused by the
    replica (500); a user_config of the wrong shape changes nothing and says so; an adapter
    removed while its requests are in flight: each of them is its exact scores or a clean
    404/503, and later ones are 404s."""
    import concurrent.futures

    from models.inputs import Chunk

    url = f"{service}/lora"
    query, items = random_request(seed=60, n_items=9, q_len=30)
    body = {"query": query, "items": items, "label_token_ids": LABELS, "model": "lora-c"}
    base = requests.post(f"{url}/v1/score", json={**body, "model": None}, timeout=120)
    assert base.status_code == 200, base.text
    replica = base.headers["X-MIS-Replicas"]

    def want(directory: str) -> np.ndarray:
        engine = ScoringEngine(
            models["qwen3-tiny"], EngineConfig(**ENGINE, max_adapters=1), {"x": directory}
        )
        chunk = Chunk(tuple(query), tuple(map(tuple, items)), tuple(LABELS), adapter="x")
        return engine.score([chunk])[0]

    def served(name: str, directory: str | None) -> dict:
        """/v1/models once it lists `name` from `directory` (None: no longer lists it)."""
        deadline = time.monotonic() + 300
        while True:
            listed = requests.get(f"{url}/v1/models", timeout=30).json()
            roots = {m["id"]: m["root"] for m in listed["data"]}
            if roots.get(name) == directory:
                return listed
            assert time.monotonic() < deadline, listed
            time.sleep(0.5)

    def scores_once_loaded(b: dict) -> np.ndarray:
        """The answer to `b`, after the 503s (Retry-After) of a replica reading its adapter:
        the first request that reaches it always gets one."""
        for attempt in range(600):
            r = requests.post(f"{url}/v1/score", json=b, timeout=120)
            if r.status_code == 200:
                assert attempt > 0, "the replica served an adapter it had not read"
                assert r.headers["X-MIS-Replicas"] == replica  # the same, never restarted
                return np.asarray(r.json()["scores"])
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            assert "adapter 'lora-c' is being loaded" in r.json()["message"], r.text
            time.sleep(0.1)
        raise AssertionError("never loaded")

    _deploy_lora(models, {"lora-c": models["lora-c"], "bad": models["not-an-adapter"]})
    listed = served("lora-c", models["lora-c"])
    assert "adapter_config.json" in listed["refused"]["bad"]
    r = requests.post(f"{url}/v1/score", json={**body, "model": "bad"}, timeout=30)
    assert r.status_code == 404 and "refused" in r.json()["message"], r.text
    c = scores_once_loaded(body)
    assert np.array_equal(c, want(models["lora-c"]))
    # The same name, another directory: its new weights, not the old ones' cached K/V.
    _deploy_lora(models, {"lora-c": models["lora-d"]})
    served("lora-c", models["lora-d"])
    d = scores_once_loaded(body)
    assert np.array_equal(d, want(models["lora-d"])) and np.abs(np.log(d) - np.log(c)).max() > 0.1
    assert "refused" not in requests.get(f"{url}/v1/models", timeout=30).json()
    # Files rewritten after the ingress checked them: refused by the replica, never served.
    import shutil

    shutil.copytree(models["lora-c"], tmp_path / "lora-e")
    _deploy_lora(models, {"lora-c": models["lora-d"], "lora-e": str(tmp_path / "lora-e")})
    served("lora-e", str(tmp_path / "lora-e"))
    shutil.copy(Path(models["lora-d"]) / "adapter_model.safetensors", tmp_path / "lora-e")
    e_body = {**body, "model": "lora-e"}
    for _ in range(600):
        if (r := requests.post(f"{url}/v1/score", json=e_body, timeout=120)).status_code != 503:
            break
        time.sleep(0.1)
    assert r.status_code == 500 and "changed since the ingress checked" in r.text, r.text
    # A user_config of the wrong shape: said in /v1/models, the adapters as they were.
    _deploy_lora(models, ["lora-c"])
    deadline = time.monotonic() + 300
    while "user_config_error" not in (listed := requests.get(f"{url}/v1/models").json()):
        assert time.monotonic() < deadline, listed
        time.sleep(0.5)
    assert listed["user_config_error"].startswith("user_config refused, adapters unchanged: ")
    assert {m["id"]: m["root"] for m in listed["data"]}["lora-c"] == models["lora-d"]
    r = requests.post(f"{url}/v1/score", json=body, timeout=120)
    assert np.array_equal(np.asarray(r.json()["scores"]), d), r.text
    # Removed while requests for it are in flight.
    post = lambda b: requests.post(f"{url}/v1/score", json=b, timeout=120)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        flying = [pool.submit(post, body) for _ in range(12)]
        _deploy_lora(models, {})
        answers = [f.result() for f in flying]
    for r in answers:
        if r.status_code == 200:
            assert np.array_equal(np.asarray(r.json()["scores"]), d)
        else:
            assert r.status_code in (404, 503), r.text
    served("lora-c", None)
    r = requests.post(f"{url}/v1/score", json=body, timeout=30)
    assert r.status_code == 404 and "'lora-c'" in r.json()["message"], r.text
    # The replica answered its 503s (an adapter being read) without logging them as failures.
    scorer_log = replica_logs("lora", "Scorer")
    assert "adapter 'lora-c' is being loaded" not in scorer_log, scorer_log[-3000:]
    assert requests.post(f"{url}/v1/score", json={**body, "model": "lora-a"}).status_code == 200
