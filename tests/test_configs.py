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


def test_pallas_attention_with_the_dense_mask_is_rejected_at_config_time():
    with pytest.raises(ValidationError, match="pallas"):
        AppArgs(mode="packed", mask_impl="dense", attention_impl="pallas")
    assert AppArgs(attention_impl="pallas").engine_config().attention_impl.value == "pallas"


def test_slice_configs_reserve_one_bundle_per_host():
    """Multi-host replicas get their hosts from Serve's bundles, or a TPU slice they reserve
    themselves (tpu_topology); single-host replicas need neither."""
    for path in CONFIGS:
        (app,) = yaml.safe_load(path.read_text())["applications"]
        args = AppArgs.model_validate(app["args"])
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
        ({"tp_size": 3}, "num_attention_heads"),  # qwen3-tiny has 4 heads
        ({"tp_size": 4, "hosts_per_replica": 3}, "hosts_per_replica"),
        ({"tp_size": 0}, "tp_size"),
    ],
)
def test_bad_parallel_args_are_rejected_at_config_time(args, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs.model_validate(args)
