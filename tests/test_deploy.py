"""The KubeRay manifests (deploy/kuberay/), checked without a cluster: generated from the
configs (regenerated and compared), valid against KubeRay's published RayService schema, their
Serve config one that `serve run` builds, and the cluster around it consistent with it."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from deploy import manifests

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "deploy" / "kuberay" / "schema" / f"rayservice-{manifests.KUBERAY_VERSION}.json"
TARGETS = {t.name: t for t in manifests.TARGETS}


def _load(name: str) -> dict:
    return yaml.safe_load((manifests.OUT / f"rayservice-{name}.yaml").read_text())


def _serve_config(m: dict) -> dict:
    return yaml.safe_load(m["spec"]["serveConfigV2"])


def _containers(m: dict) -> list[dict]:
    cluster = m["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [c for p in pods for c in p["template"]["spec"]["containers"]]


def test_manifests_are_generated_from_the_configs(tmp_path):
    """Regenerate and compare: a config changed without `python -m deploy.manifests` fails."""
    assert manifests.main(["--check"]) == 0
    assert manifests.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "rayservice-gpu.yaml").write_text("stale\n")
    assert manifests.main(["--check", "--out", str(tmp_path)]) == 1
    assert sorted(p.name for p in manifests.OUT.glob("*.yaml")) == sorted(
        f"rayservice-{name}.yaml" for name in TARGETS
    )


@pytest.mark.parametrize("name", TARGETS)
def test_serve_config_and_environment_are_the_configs(name):
    """One source of truth: the Serve config is the config file, text and all; every Ray
    container's environment carries configs/serve.env (Ray reads it when it starts)."""
    m = _load(name)
    assert m["spec"]["serveConfigV2"] == (REPO / "configs" / TARGETS[name].config).read_text()
    want = dict(manifests.serve_env())
    assert want and "RAY_SERVE_ENABLE_HA_PROXY" in want
    for c in _containers(m):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert {k: env.get(k) for k in want} == want, c["name"]


# --- KubeRay's schema --------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD's structural schema as the API server applies it with kubectl's default strict
    field validation: an object schema that lists its properties (and neither preserves unknown
    fields nor declares additionalProperties) rejects any other field."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def _cel_paths(schema: dict, doc, path: str = "") -> list[str]:
    """Fields of `doc` whose schema carries CEL rules (x-kubernetes-validations), which
    jsonschema cannot evaluate: the manifests must set none of them."""
    found = []
    if "x-kubernetes-validations" in schema:
        found.append(path)
    if isinstance(doc, dict):
        for k, v in doc.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                found += _cel_paths(sub, v, f"{path}/{k}")
    elif isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            found += _cel_paths(schema["items"], v, f"{path}/{i}")
    return found


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    return schema, jsonschema.Draft7Validator(_strict(schema))


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("name", TARGETS)
def test_manifest_is_valid_against_kuberay_rayservice_schema(validator, name):
    schema, check = validator
    m = _load(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    assert _errors(check, m) == []
    assert _cel_paths(schema, m) == []
    # KubeRay's own checks of the object (utils/validation.go, ValidateRayServiceMetadata):
    assert len(m["metadata"]["name"]) <= 47
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", m["metadata"]["name"])


def test_the_schema_check_catches_mistakes(validator):
    """A misspelled field, a misplaced one and a wrong type are each an error."""
    _, check = validator
    m = _load("gpu")
    worker = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    bad = copy.deepcopy(m)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in _errors(check, bad))
    bad = copy.deepcopy(m)
    container = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    container["readinessProbe"] = worker["template"]["spec"]["containers"][0]["readinessProbe"]
    assert any("readinessProbe" in e for e in _errors(check, bad))
    bad = copy.deepcopy(m)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "1"
    assert any("minReplicas" in e for e in _errors(check, bad))


# --- the Serve config ----------------------------------------------------------------------


@pytest.mark.parametrize("name", TARGETS)
def test_embedded_serve_config_builds_as_serve_run_does(name, monkeypatch):
    """What `serve run` / KubeRay's submission does before deploying: the config validates as
    a ServeDeploySchema, each application's builder runs with its args, and the graph it
    builds has every deployment the config configures."""
    import serve_app.app

    # The GPU/TPU configs name the random-weight qwen3-0.6b demo model (1.2-2.4 GB to write):
    # the builder's call to generate it is recorded instead.
    presets = []
    monkeypatch.setattr(
        serve_app.app, "ensure_demo_checkpoint", lambda p: presets.append(p) or Path("/demo")
    )
    config = _serve_config(_load(name))
    schema = ServeDeploySchema.model_validate(config)
    assert schema.proxy_location == "EveryNode" and schema.http_options.host == "0.0.0.0"
    for app in schema.applications:
        module, attr = app.import_path.split(":")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        graph = call_user_app_builder_with_args_if_necessary(builder, app.args)
        built = build_app(graph, name=app.name)
        names = {d.name for d in built.deployments}
        assert {d.name for d in app.deployments} <= names, names
        assert built.ingress_deployment_name == "ScoreIngress"
    assert presets == [config["applications"][0]["args"]["model"]["demo_preset"]]


# --- the cluster around it -----------------------------------------------------------------


def _deployments(m: dict) -> dict[str, dict]:
    (app,) = _serve_config(m)["applications"]
    return {d["name"]: d for d in app["deployments"]}


def _args(m: dict) -> dict:
    (app,) = _serve_config(m)["applications"]
    return app["args"]


def _pod_capacity(group: dict) -> dict[str, float]:
    """Ray's resources of one pod of the group, as KubeRay starts it: CPUs, GPUs and TPUs from
    the container's limits (rayStartParams override none here)."""
    assert group["rayStartParams"] == {}, "Ray's resources come from the limits"
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cap = {"CPU": float(limits["cpu"])}
    for k8s, ray in (("nvidia.com/gpu", "GPU"), ("google.com/tpu", "TPU")):
        if k8s in limits:
            cap[ray] = float(limits[k8s])
    return cap


def _actor(options: dict) -> dict[str, float]:
    need = {"CPU": float(options.get("num_cpus", 1))}
    if options.get("num_gpus"):
        need["GPU"] = float(options["num_gpus"])
    return need | {k: float(v) for k, v in options.get("resources", {}).items()}


def _actors(m: dict, scale: str) -> list[dict[str, float]]:
    """Every Ray resource bundle the app asks for with its Scorer at `scale` (min or max
    replicas): replica actors, and a slice replica's host bundles (one per host)."""
    deps, args = _deployments(m), _args(m)
    out = []
    for d in deps.values():
        auto = d.get("autoscaling_config")
        n = auto[f"{scale}_replicas"] if auto else d.get("num_replicas", 1)
        out += [_actor(d.get("ray_actor_options", {}))] * n
    placement = args.get("placement", {})
    hosts = placement.get("hosts_per_replica", 1)
    if hosts > 1:
        bundle = {"CPU": float(placement["host_num_cpus"])} | {
            k: float(v) for k, v in placement.get("host_resources", {}).items()
        }
        scorer = deps["Scorer"]["autoscaling_config"][f"{scale}_replicas"]
        out += [bundle] * (hosts * scorer)
    return out


def _fits(actors: list[dict[str, float]], pods: list[dict[str, float]]) -> bool:
    """First-fit decreasing: can every bundle be placed, each on one pod?"""
    free = [dict(p) for p in pods]
    for need in sorted(
        actors, key=lambda a: (a.get("TPU", 0), a.get("GPU", 0), a["CPU"]), reverse=True
    ):
        for pod in free:
            if all(pod.get(k, 0) >= v for k, v in need.items()):
                for k, v in need.items():
                    pod[k] -= v
                break
        else:
            return False
    return True


def _pods(groups: list[dict], count: str, less: str | None = None) -> list[dict[str, float]]:
    """Ray's resources of the pods of every group at `count` (minReplicas / maxReplicas), one
    replica (a slice: numOfHosts pods) fewer in group `less`."""
    pods = []
    for g in groups:
        n = g[count] - (g["groupName"] == less)
        pods += [_pod_capacity(g)] * (n * g.get("numOfHosts", 1))
    return pods


@pytest.mark.parametrize("name", TARGETS)
def test_ray_autoscaler_holds_serve_autoscaling(name):
    """Serve asks for Scorer replicas within min..max_replicas; Ray's autoscaler adds pods
    within each group's min..max. At min_replicas everything fits the groups' minReplicas
    pods (nothing waits for a scale-up), at max_replicas their maxReplicas pods, and an
    accelerator group has no pod (slice) that max_replicas leaves unused."""
    m = _load(name)
    cluster = m["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}  # no replica there
    groups = cluster["workerGroupSpecs"]
    scorer = _deployments(m)["Scorer"]
    assert "num_replicas" not in scorer and scorer["autoscaling_config"]["min_replicas"] >= 1
    for g in groups:
        assert 1 <= g["minReplicas"] == g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert _fits(_actors(m, "min"), _pods(groups, "minReplicas"))
    assert _fits(_actors(m, "max"), _pods(groups, "maxReplicas"))
    for g in groups:
        if set(_pod_capacity(g)) & {"GPU", "TPU"}:
            assert not _fits(_actors(m, "max"), _pods(groups, "maxReplicas", less=g["groupName"]))
    # Pods' requests are what Ray is told it has (Guaranteed QoS, accelerators whole).
    for c in _containers(m):
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]


def test_tpu_slice_group_is_the_configs_slice():
    """The slice group is what configs/tpu-v6e-16-slice.yaml reserves per replica: hosts of
    the topology on GKE's v6e slice nodes, chips per host = the host actors' TPUs, all chips =
    engine.tp_size; and a host keeps room for its slice bundle even if every light actor
    (ingress and Scorer replica actors) lands on it."""
    m = _load("tpu-v6e-16-slice")
    args = _args(m)
    placement = args["placement"]
    (g,) = [g for g in m["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g.get("numOfHosts")]
    cap = _pod_capacity(g)
    selector = g["template"]["spec"]["nodeSelector"]
    chips = math.prod(int(x) for x in placement["tpu_topology"].split("x"))
    assert selector["cloud.google.com/gke-tpu-topology"] == placement["tpu_topology"]
    assert (
        selector["cloud.google.com/gke-tpu-accelerator"] == f"tpu-{placement['tpu_version']}-slice"
    )
    assert g["numOfHosts"] == placement["hosts_per_replica"] == chips // cap["TPU"]
    assert cap["TPU"] == placement["host_resources"]["TPU"]
    assert chips == args["engine"]["tp_size"]
    light = sum(
        _actor(d["ray_actor_options"])["CPU"]
        * d.get("num_replicas", d.get("autoscaling_config", {}).get("max_replicas", 1))
        for d in _deployments(m).values()
    )
    assert cap["CPU"] - light >= placement["host_num_cpus"]
    # A pod fits its host, a v6e TPU VM (GKE ct6e-standard-4t: 180 vCPUs, 720 GB), with room
    # for GKE's own reservations.
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) <= 0.9 * 180
    assert int(limits["memory"].removesuffix("Gi")) * 2**30 <= 0.9 * 720e9


@pytest.mark.parametrize("name", TARGETS)
def test_probes(name):
    """Worker pods that run Serve replicas are probed through their Serve proxy: readiness on
    /health, liveness on /livez (held off by a startup probe while the app deploys); a slice
    host (no proxy) is kept out of the Serve Service by the same readiness probe and keeps
    KubeRay's node-health liveness. The head has none of ours: KubeRay submits the Serve
    config only once the head is ready, so /health there would wait for itself."""
    m = _load(name)
    cluster = m["spec"]["rayClusterConfig"]
    port = _serve_config(m)["http_options"]["port"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(head)
    assert m["spec"]["excludeHeadPodFromServeSvc"] is True
    serving = 0
    for g in cluster["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert {"name": "serve", "containerPort": port} in c["ports"]
        ready = c["readinessProbe"]
        assert ready["httpGet"] == {"path": "/health", "port": "serve"}
        if g.get("numOfHosts", 1) > 1:
            assert "livenessProbe" not in c and "startupProbe" not in c
            continue
        serving += 1
        live, start = c["livenessProbe"], c["startupProbe"]
        assert live["httpGet"] == start["httpGet"] == {"path": "/livez", "port": "serve"}
        # An idle pod (its last replica, and the proxy with it, gone) is removed by the
        # autoscaler before liveness would restart it.
        idle = cluster["autoscalerOptions"]["idleTimeoutSeconds"]
        assert live["periodSeconds"] * live["failureThreshold"] > idle
        assert start["periodSeconds"] * start["failureThreshold"] >= 600
    assert serving >= 1


@pytest.mark.parametrize("name", TARGETS)
def test_api_keys_from_a_secret_and_cache_on_a_volume(name):
    m = _load(name)
    assert "api_keys" not in _args(m).get("auth", {})  # never in the Serve config
    cluster = m["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for p in pods:
        volumes = {v["name"]: v for v in p["template"]["spec"]["volumes"]}
        (c,) = p["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["MIS_API_KEYS"] == {
            "name": "MIS_API_KEYS",
            "valueFrom": {
                "secretKeyRef": {"name": manifests.SECRET, "key": "MIS_API_KEYS", "optional": False}
            },
        }
        (mount,) = [v for v in c["volumeMounts"] if v["name"] == "cache"]
        assert "cache" in volumes
        # The demo checkpoint and JAX's compilation cache ($MIS_SERVE_CACHE/jax) on it.
        assert env["MIS_SERVE_CACHE"]["value"].startswith(mount["mountPath"] + "/")
        assert "JAX_COMPILATION_CACHE_DIR" not in env


def test_images_run_the_ray_version_the_tests_run():
    import ray

    assert ray.__version__ == manifests.RAY_VERSION
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={manifests.RAY_VERSION}" in dockerfile
    for name in TARGETS:
        assert _load(name)["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
