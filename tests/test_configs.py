"""Every shipped config parses as a Serve config and its args validate as AppArgs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    AppArgs.model_validate(app.args)
    names = {d.name for d in app.deployments}
    assert names == {"ScoreIngress", "Scorer"}


def test_cpu_config_fits_two_cores():
    raw = yaml.safe_load((CONFIGS[0].parent / "config.yaml").read_text())
    deps = raw["applications"][0]["deployments"]
    cpus = sum(
        d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1))
        * d["ray_actor_options"]["num_cpus"]
        for d in deps
    )
    assert cpus <= 2


def test_unknown_args_are_rejected():
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"chunk_sizes": 3})
    with pytest.raises(ValueError, match="extra"):
        AppArgs.parse({"engine.chunk_size": 3})
    with pytest.raises(ValueError, match="not a group"):
        AppArgs.parse({"engine": 1, "engine.mode": "prefix"})


def test_dotted_keys_reach_into_groups():
    """`serve run serve_app.app:build_app engine.mode=packed ...` on the command line."""
    args = AppArgs.parse(
        {"engine.mode": "packed", "engine.attention": "xla", "fanout.chunk_items": 8}
    )
    assert args.engine.mode.value == "packed" and args.engine.attention.value == "xla"
    assert args.fanout.chunk_items == 8
    assert args.scorer_args().engine == args.engine  # one home, handed down as is


def test_api_keys_reach_only_the_ingress():
    args = AppArgs.parse({"auth.api_keys": ["k1"]})
    assert [k.get_secret_value() for k in args.ingress_args().auth.api_keys] == ["k1"]
    assert "auth" not in type(args.scorer_args()).model_fields
    assert "k1" not in str(args.model_dump(mode="json"))  # printed as ***


def test_dense_attention_outside_packed_mode_is_rejected_at_config_time():
    with pytest.raises(ValidationError, match="dense"):
        AppArgs.parse({"engine.mode": "prefix", "engine.attention": "dense"})
    assert AppArgs.parse({"engine.attention": "pallas"}).engine.attention.value == "pallas"


def test_a_query_longer_than_a_forward_is_rejected_at_config_time():
    with pytest.raises(ValidationError, match="max_query_tokens"):
        AppArgs.parse({"engine.max_batch_tokens": 1024, "engine.max_query_tokens": 2048})


def test_slice_configs_reserve_one_bundle_per_host():
    """Multi-host replicas get their hosts from Serve's bundles, or a TPU slice they reserve
    themselves (tpu_topology); single-host replicas need neither."""
    for path in CONFIGS:
        (app,) = yaml.safe_load(path.read_text())["applications"]
        args = AppArgs.model_validate(app["args"]).placement
        (scorer,) = [d for d in app["deployments"] if d["name"] == "Scorer"]
        bundles = scorer.get("placement_group_bundles", [])
        if args.hosts_per_replica > 1 and args.tpu_topology is None:
            assert len(bundles) == args.hosts_per_replica, path.name
            assert scorer["placement_group_strategy"] == "STRICT_SPREAD", path.name
            for b in bundles:  # each host actor fits its bundle
                assert b["CPU"] >= args.host_num_cpus, path.name
                assert all(b.get(k, 0) >= v for k, v in args.host_resources.items()), path.name
        elif args.hosts_per_replica > 1:
            assert not bundles and args.host_resources.get("TPU"), path.name
        else:
            assert not bundles, path.name


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"engine.tp_size": 3}, "num_attention_heads"),  # qwen3-tiny has 4 heads
        ({"engine.tp_size": 4, "placement.hosts_per_replica": 3}, "hosts_per_replica"),
        ({"engine.tp_size": 0}, "tp_size"),
        # a slice's compiles would count against forward_timeout_s (only one host's can't)
        ({"engine.tp_size": 4, "placement.hosts_per_replica": 2, "warmup": False}, "warmup"),
    ],
)
def test_bad_parallel_args_are_rejected_at_config_time(args, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs.parse(args)


def test_test_port_windows_below_ephemeral_range(monkeypatch):
    """Every test cluster's ports, of every documented MIS_TEST_PORT_GROUP, lie below Linux's
    ephemeral range: a port the kernel hands out to some other process (a client socket, a Ray
    worker) never collides with one a test cluster binds. A group past the last is refused."""
    from tests import conftest

    top = conftest._FIRST_PORT + conftest._GROUPS * conftest._SLOTS * conftest._WINDOW
    assert top <= conftest._ephemeral_start(), (top, conftest._ephemeral_start())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("MIS_TEST_PORT_GROUP", str(conftest._GROUPS - 1))
    with pytest.raises(ValueError, match="MIS_TEST_PORT_GROUP"):
        conftest.cluster_ports()
