"""Shared fixtures: random-init HF checkpoints (generated once per session) and engines."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ray Serve as scripts/serve.sh runs it (HAProxy, gRPC, auth off): each setting of
# configs/serve.env not already set (read by the same rules), before any Ray process starts.
os.environ.update(
    {
        m[1]: m[2]
        for m in re.finditer(
            r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(.*?)\r?$",
            (Path(__file__).parents[1] / "configs/serve.env").read_text(),
            re.MULTILINE,
        )
        if m[1] not in os.environ
    }
)
# JAX's persistent compilation cache, under the checkout (not the user's home): every process
# of the run (Serve replicas, CLI subprocesses, slice hosts) inherits it, so a program compiled
# once is loaded, not compiled, by the next process that needs it; a second run starts warm.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Four simulated CPU devices for the tensor-parallel tests, set before JAX starts (the last
# occurrence of a flag wins); engines without tp_size use the first device only.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import numpy as np
import pytest

from mis_score.bench import hf_scores
from models.checkpoint import make_random_checkpoint
from models.engine import EngineConfig, ScoringEngine
from models.tokenizer import TextTokenizer

# pytest loads this file as the module `conftest` (tests/ is no package) and the test modules
# import it as `tests.conftest`: one module under both names, or its state (the session's
# cluster, the engines, the port windows handed out) would exist twice, each copy seeing half.
sys.modules.setdefault("tests.conftest", sys.modules[__name__])

TP_DEVICES = 4  # the simulated device count set above

# Every engine configuration the equivalence tests sweep: (mode, attention).
MODES = [("serial", "auto"), ("packed", "dense"), ("packed", "auto"), ("prefix", "auto")]
LABELS = [9454, 2753, 13]
# Test engines: small forwards, so a request spans several and the planner's budget paths run.
TEST_ENGINE = {"max_batch_tokens": 1024, "max_item_tokens": 64, "max_query_tokens": 512}


def mode_name(mode: str, attention: str = "auto") -> str:
    return mode if attention == "auto" else f"{mode}-{attention}"


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
    """engine(ckpt_name, mode="prefix", attention="auto", **engine settings) -> an engine,
    one per distinct configuration for the whole session."""

    def get(name: str, mode: str = "prefix", attention: str = "auto", **settings):
        config = TEST_ENGINE | {"mode": mode, "attention": attention} | settings
        key = (name, tuple(sorted(config.items())))
        if key not in _ENGINES:
            _ENGINES[key] = ScoringEngine(ckpts[name], EngineConfig(**config))
        return _ENGINES[key]

    return get


@pytest.fixture(scope="session")
def tokenizer(ckpts):
    """tokenizer(ckpt_name) -> the checkpoint's tokenizer (the real Qwen3 one)."""
    return lambda name: TextTokenizer.from_model_dir(ckpts[name])


_HF_REFERENCE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def hf_reference(path: str, query, items, labels, dtype=None, item_first: bool = False):
    """HF transformers' PyTorch model on the same checkpoint, each item on its own
    (mis_score.bench.hf_scores): (softmax over the label logits, full-vocab log-probs of the
    labels). `dtype`: a torch dtype (default float32; float64 is the reference for float32
    precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    key = (path, str(dtype), item_first, tuple(query), tuple(map(tuple, items)), tuple(labels))
    if key not in _HF_REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        queries, rows = list(query), [list(it) for it in items]
        _HF_REFERENCE[key] = hf_scores(model, queries, rows, list(labels), item_first=item_first)
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


def pytest_collection_modifyitems(items):
    """Modules marked `ray` (the longest) first: both pytest-xdist workers start on them, and
    the short engine tests fill in at the end rather than leaving one worker a long tail."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker's figures join the controller's when it finishes."""
    for name, value in getattr(node, "workeroutput", {}).get("figures", {}).items():
        FIGURES[name] = max(FIGURES.get(name, 0.0), value)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured max abs diffs")
        for name in sorted(FIGURES):
            terminalreporter.write_line(f"{name:60s} {FIGURES[name]:.3g}")


# One Ray cluster with Serve for every in-process serving test of the session (started on
# first use, stopped at the end): each module deploys its apps and deletes them afterwards.
_CLUSTER: dict[str, object] = {}


def serve_cluster() -> tuple[str, int]:
    """(base URL, Prometheus metrics port) of the session's local Ray + Serve."""
    if not _CLUSTER:
        ports = cluster_ports()
        os.environ.update(ports.env())
        import ray
        from ray import serve

        port, metrics = ports.http, ports.metrics
        # Metrics reach the Prometheus endpoint within a second or two, not Ray's default 10 s.
        os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (Ray spells it so)
        ray.init(
            address="local",  # never a cluster the user (or another test) has running
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        except BaseException:
            # Not half a cluster: the next module's serve_cluster() starts a whole new one
            # (a Ray left initialised made every later ray.init of the worker fail).
            ray.shutdown()
            raise
        _CLUSTER.update(url=f"http://127.0.0.1:{port}", metrics=metrics)
    return str(_CLUSTER["url"]), int(_CLUSTER["metrics"])  # type: ignore[call-overload]


def deployment_of(app: str) -> str:
    """The X-MIS-Deployment of `app` on the session's cluster (serve_app.config)."""
    import ray

    from serve_app.config import deployment_identity

    return deployment_identity(app, ray.get_runtime_context().get_session_name())


def replica_logs(app: str, deployment: str) -> str:
    """What the replicas of `app`'s `deployment` have logged so far on the session's cluster."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(
        p.read_text(errors="replace") for p in logs.glob(f"replica_{app}_{deployment}_*")
    )


def stop_serve_cluster() -> None:
    """Stop the session's Ray (the next serve_cluster() starts a new one)."""
    if _CLUSTER:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        _CLUSTER.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a worker's last test marked `ray` (they run first), its session cluster stops:
    idle, it still took about 11 CPU-seconds a minute (Serve's controller, proxies, replicas,
    metrics) from the engine tests that follow on the same two cores."""
    result = yield  # the test's own fixtures (a module's deployed apps) are torn down first
    # Not while the module goes on: its apps (module fixtures) are deleted at its last test.
    if _CLUSTER and (
        nextitem is None
        or (nextitem.get_closest_marker("ray") is None and nextitem.module is not item.module)
    ):
        stop_serve_cluster()
    return result


def pytest_sessionfinish(session, exitstatus):
    stop_serve_cluster()
    if hasattr(session.config, "workeroutput"):  # an xdist worker: figures to the controller
        session.config.workeroutput["figures"] = dict(FIGURES)


@contextlib.contextmanager
def running_serve(*apps: tuple[str, str, object]) -> Iterator[str]:
    """`apps` ((name, route prefix, built application) each) deployed on the session's
    cluster; yields the base URL and deletes the apps afterwards."""
    from ray import serve

    url, _ = serve_cluster()
    try:
        for name, route, app in apps:
            serve.run(app, name=name, route_prefix=route)
        yield url
    finally:
        for name, _, _ in apps:
            serve.delete(name)


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # serve, ray, locust of this environment


_CLUSTERS_STARTED = itertools.count()
_WINDOW = 200  # ports of one test cluster
# Test clusters one pytest worker starts (a worker starts at most 4: the session's, the
# multinode test's two, `serve run`'s); more reuse the first windows, long stopped by then.
_SLOTS = 8
_FIRST_PORT = 20000  # above Ray's worker ports (10002-19999), below the ephemeral range
_GROUPS = 6  # MIS_TEST_PORT_GROUP 0-5: up to three 2-worker runs on one machine at once


def _ephemeral_start() -> int:
    """Where Linux starts handing out ports to any process that asks (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclasses.dataclass(frozen=True)
class ClusterPorts:
    """Every port a test cluster listens on that Ray would otherwise take from a fixed default
    or from the ports free at the moment: a window of its own, by pytest worker and by
    cluster, below the ephemeral range (so no other process picks one by chance). In a run of
    2026-12-03 two clusters shared Serve's fallback proxy port (8500, bound with SO_REUSEPORT):
    the multinode cluster's HAProxy, its app not deployed yet, handed a 200-item request to the
    other worker's proxy, whose app scored it."""

    base: int

    def port(self, i: int) -> int:
        return self.base + 170 + i  # 170..199: single ports, see env()

    @property
    def http(self) -> int:
        return self.port(0)

    @property
    def metrics(self) -> int:
        return self.port(1)

    @property
    def dashboard(self) -> int:
        return self.port(2)

    @property
    def gcs(self) -> int:
        return self.port(3)

    def env(self) -> dict[str, str]:
        """Serve's own ports, read from the environment when Ray starts."""
        b = self.base
        return {
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(b),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(b + 79),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(b + 80),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(b + 159),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(b + 160),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(b + 161),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(b + 162),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(b + 163),
        }


def cluster_ports() -> ClusterPorts:
    """The next test cluster's ports (see ClusterPorts)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    # Another test run at the same time on this machine: MIS_TEST_PORT_GROUP=2 (or 4) moves
    # this run's windows past the first run's two workers.
    worker += int(os.environ.get("MIS_TEST_PORT_GROUP", "0"))
    if not 0 <= worker < _GROUPS:
        raise ValueError(
            f"MIS_TEST_PORT_GROUP + pytest worker = {worker}: 0 to {_GROUPS - 1} (groups 0, 2 "
            "and 4 for three 2-worker runs at once)"
        )
    slot = worker * _SLOTS + next(_CLUSTERS_STARTED) % _SLOTS
    return ClusterPorts(_FIRST_PORT + slot * _WINDOW)


def serve_ports() -> dict[str, str]:
    """Serve's ports for the next test cluster (environment settings; see ClusterPorts)."""
    return cluster_ports().env()


@contextlib.contextmanager
def _sigint_delivered_to_children() -> Iterator[None]:
    """While it lasts, processes started here get SIGINT delivered and handled. A test run
    started in the background of a non-interactive shell (`cmd &`, as CI runners may) ignores
    SIGINT, and an ignored SIGINT survives exec: `serve run` would never see its Ctrl-C. A
    handler does not survive exec (the child starts with the default), so one is set here, in
    this thread, around the start. Not a preexec_fn: Python code run between fork and exec in
    a process with JAX's threads can deadlock on a lock one of them held (JAX warns of it)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal needs it
        raise RuntimeError("start `serve run` from the main thread")
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextlib.contextmanager
def serve_run(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Path]:
    """`serve run CONFIG` as a user starts it, output to `log`; SIGINT (Serve shuts the apps
    down) on exit, then SIGKILL to anything of its process group still running."""
    env = os.environ | {"JAX_PLATFORMS": "cpu"} | serve_ports() | (env or {})
    with log.open("w") as out:
        with _sigint_delivered_to_children():
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
            # Every process it started, found now: Ray puts some in groups and sessions of
            # their own (Serve's HAProxy), and once `serve run` is gone they are orphans no
            # group kill reaches. A HAProxy left behind by a shutdown cut short kept port 8000,
            # and the next `serve run` on this machine never answered.
            tree = descendants(proc.pid)
            # SIGINT to `serve run` alone: to its whole group it would also stop the Ray
            # processes it started, and its shutdown then waits a minute for a dead GCS.
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):  # whatever it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            kill_all(tree + descendants(proc.pid))


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list) -> None:
    """SIGKILL to each process still running (psutil checks it is the same process, not a
    new one that reused the pid)."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


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
