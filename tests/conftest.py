"""Shared fixtures: random-init HF checkpoints (generated once per session) and engines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Four simulated CPU devices for the tensor-parallel tests, set before JAX starts (the last
# occurrence of a flag wins); engines without tp_size use the first device only.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import numpy as np
import pytest

from models.checkpoint import make_random_checkpoint
from models.engine import EngineConfig, ScoringEngine

TP_DEVICES = 4  # the simulated device count set above

# Every engine configuration the equivalence tests sweep: (mode, mask_impl).
MODES = [("serial", "auto"), ("packed", "dense"), ("packed", "segment"), ("prefix", "auto")]
LABELS = [9454, 2753, 13]
CHUNK = 8  # small, so 21 items make several chunks and a partial one


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """qwen3 (tied, Hub config layout, one file), qwen3 untied (transformers 5 layout,
    sharded), qwen2 (qkv bias, sharded) and a bfloat16 qwen3."""
    root = tmp_path_factory.mktemp("ckpts")
    shard = 16 * 2**20
    return {
        "qwen3": str(make_random_checkpoint("qwen3-tiny", root / "qwen3", seed=1)),
        "qwen3-untied": str(
            make_random_checkpoint(
                "qwen3-tiny-untied",
                root / "qwen3-untied",
                seed=2,
                max_shard_bytes=shard,
                config_layout="transformers5",
            )
        ),
        "qwen2": str(
            make_random_checkpoint("qwen2-tiny", root / "qwen2", seed=3, max_shard_bytes=shard)
        ),
        "qwen3-bf16": str(
            make_random_checkpoint("qwen3-tiny", root / "qwen3-bf16", seed=4, dtype="bfloat16")
        ),
    }


_ENGINES: dict[tuple, ScoringEngine] = {}


@pytest.fixture(scope="session")
def engine(ckpts):
    """engine(ckpt_name, mode, mask_impl, chunk, rows, attention_impl) -> a cached engine."""

    def get(
        name: str,
        mode: str = "prefix",
        mask: str = "auto",
        chunk: int = CHUNK,
        rows: int = 1,
        impl: str = "xla",
    ):
        key = (name, mode, mask, chunk, rows, impl)
        if key not in _ENGINES:
            _ENGINES[key] = ScoringEngine(
                ckpts[name],
                EngineConfig(
                    mode=mode,
                    mask_impl=mask,
                    chunk_size=chunk,
                    max_batch_rows=rows,
                    attention_impl=impl,
                ),
            )
        return _ENGINES[key]

    return get


_HF_REFERENCE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def hf_reference(path: str, query, items, labels, dtype=None, item_first: bool = False):
    """HF transformers' PyTorch model on the same checkpoint, one forward per item:
    (softmax over the label logits, full-vocab log-probs of the labels). `dtype`: a torch
    dtype (default float32; float64 is the reference for float32 precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    key = (path, str(dtype), item_first, tuple(query), tuple(map(tuple, items)), tuple(labels))
    if key not in _HF_REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        soft, logp = [], []
        with torch.no_grad():
            for it in items:
                ids = it + query if item_first else query + it
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                soft.append(torch.softmax(logits[labels], -1).numpy())
                logp.append(torch.log_softmax(logits, -1)[labels].numpy())
        _HF_REFERENCE[key] = (np.array(soft), np.array(logp))
    return _HF_REFERENCE[key]


def random_request(seed: int, n_items: int = 21, q_len: int = 37, max_item: int = 30):
    """Token-id query and items; item lengths cover several slot buckets (1..max_item)."""
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 151_000, q_len).tolist()
    lengths = rng.integers(1, max_item + 1, n_items)
    items = [rng.integers(0, 151_000, n).tolist() for n in lengths]
    return query, items


# Measured figures (max abs diffs) gathered by the tests and printed at the end of the run, so
# the numbers quoted in docs come from the test command itself.
FIGURES: dict[str, float] = {}


@pytest.fixture
def record():
    """record(name, value): keep the largest value seen under `name` for the summary."""

    def put(name: str, value: float) -> None:
        FIGURES[name] = max(FIGURES.get(name, 0.0), float(value))

    return put


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured max abs diffs")
        for name in sorted(FIGURES):
            terminalreporter.write_line(f"{name:60s} {FIGURES[name]:.3g}")


@contextlib.contextmanager
def running_serve(*apps: tuple[str, str, object], metrics_port: int | None = None) -> Iterator[str]:
    """Real Ray + Serve on a free local port running `apps` ((name, route prefix, built
    application) each); yields the base URL, shuts everything down afterwards. Ray exports
    Prometheus metrics on `metrics_port` when given."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        address="local",  # never a cluster some other test left running
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, route, app in apps:
            serve.run(app, name=name, route_prefix=route)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # serve, ray, locust of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_run(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Path]:
    """`serve run CONFIG` as a user starts it, output to `log`; SIGINT (Serve shuts the apps
    down) on exit, SIGKILL if that hangs."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "JAX_PLATFORMS": "cpu"} | (env or {})
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "serve"), "run", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield log
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for_scores(url: str, body: dict, log: Path, timeout_s: float = 420):
    """POST `body` to /v1/score until the app answers 200 (it is deploying meanwhile);
    fails with the log's tail when it does not."""
    import requests

    deadline, resp = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            resp = requests.post(f"{url}/v1/score", json=body, timeout=60)
            if resp.status_code == 200:
                return resp
        except (requests.ConnectionError, requests.Timeout):  # still deploying
            pass
        if "Deploying app 'mis' failed" in log.read_text():
            break
        time.sleep(2)
    raise AssertionError(f"no scores from {url}: {resp}\n{log.read_text()[-4000:]}")
