"""KubeRay RayService manifests, one per shipped cluster config: `python -m deploy.manifests`
writes deploy/kuberay/rayservice-<name>.yaml (`--check`: exit 1 when a written file differs,
as tests/test_deploy.py checks; `--image-repo` / `--out` for your own copies).

One source of truth: each manifest's `serveConfigV2` is its configs/*.yaml file, text and all,
and every Ray container's environment starts with configs/serve.env (Ray reads those settings
when it starts, so they cannot be in the Serve config). What this module adds is the cluster
around them: pod sizes, worker groups sized for the Scorer's autoscaling range, probes, the
compilation cache's volume and the API keys' Secret.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "deploy" / "kuberay"
KUBERAY_VERSION = "v1.7.0"  # the RayService schema the manifests are checked against
RAY_VERSION = "2.60.0"  # what pyproject installs (ray[serve,data]>=2.60), in the image
IMAGE_REPO = "mis-serve"  # built from deploy/Dockerfile; push it and pass --image-repo
IMAGE_TAG = "0.1.0"

SECRET = "mis-serve-api-keys"  # kubectl create secret generic mis-serve-api-keys ...
SECRET_KEY = "MIS_API_KEYS"  # read by the ingress (serve_app/guard.py KEYS_ENV)
CACHE_MOUNT = "/cache"
# MIS_SERVE_CACHE: the demo checkpoint and JAX's compilation cache ($MIS_SERVE_CACHE/jax).
CACHE_DIR = f"{CACHE_MOUNT}/mis-serve"
CACHE_SIZE = "20Gi"  # the compilation cache keeps at most 4 GiB; the rest is checkpoints

SERVE_PORT = 8000
METRICS_PORT = 8080  # KubeRay's --metrics-export-port
# Probes of a pod that runs a Serve proxy, through it: readiness is /health (200 once a Scorer
# replica can take a chunk), liveness /livez (the ingress answers). The startup probe holds
# liveness off while the pod joins, its replica starts and the app deploys (15 min).
READINESS = {"path": "/health", "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2}
LIVENESS = {"path": "/livez", "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 6}
STARTUP = {"path": "/livez", "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 90}
# The autoscaler removes a worker pod idle this long: shorter than LIVENESS's 120 s, so a pod
# whose last replica left (and its proxy with it) is gone before its liveness probe fails.
IDLE_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Group:
    """A KubeRay worker group: `replicas`/`min`/`max` pods (TPU: slices of `hosts` pods)."""

    name: str
    cpu: int
    memory: str
    min: int
    max: int
    hosts: int = 1
    accelerators: tuple[tuple[str, str], ...] = ()  # (resource, count) per pod
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[str, str], ...] = ()  # (key, effect)
    serves: bool = True  # runs Serve replicas, so a Serve proxy: probed through it


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    config: str  # configs/<config>
    image_suffix: str  # the image variant (deploy/Dockerfile's EXTRA)
    groups: tuple[Group, ...]
    head_cpu: int = 2
    head_memory: str = "8Gi"


def _tpu_slice_group() -> Group:
    """The v6e-16 slice group as configs/tpu-v6e-16-slice.yaml places a replica: 4 hosts of 4
    chips (GKE's tpu-v6e-slice, topology 4x4), one replica per slice, 1..4 slices. A host's
    Ray CPUs leave room for the slice bundle (8) even if the light actors (ingress, Scorer
    replica actors: 6 CPUs at most) all land on one host. A v6e host (GKE ct6e-standard-4t)
    has 180 vCPUs and 720 GB."""
    return Group(
        name="tpu-v6e-16",
        cpu=16,
        memory="200Gi",
        min=1,
        max=4,
        hosts=4,
        accelerators=(("google.com/tpu", "4"),),
        node_selector=(
            ("cloud.google.com/gke-tpu-accelerator", "tpu-v6e-slice"),
            ("cloud.google.com/gke-tpu-topology", "4x4"),
        ),
        tolerations=(("google.com/tpu", "NoSchedule"),),
        serves=False,
    )


TARGETS = (
    Target("cpu", "cpu.yaml", "", (Group("cpu", cpu=8, memory="16Gi", min=1, max=8),)),
    Target(
        "gpu",
        "gpu.yaml",
        "-cuda",
        (
            # Fits a 12-vCPU, 48 GB node with one GPU (GKE g2-standard-12, one L4; about 11.5
            # CPUs and 43 GB allocatable) and anything larger.
            Group(
                "gpu",
                cpu=8,
                memory="32Gi",
                min=1,
                max=8,
                accelerators=(("nvidia.com/gpu", "1"),),
                tolerations=(("nvidia.com/gpu", "NoSchedule"),),
            ),
        ),
    ),
    Target(
        "tpu-v6e-16-slice",
        "tpu-v6e-16-slice.yaml",
        "-tpu",
        (Group("cpu", cpu=8, memory="16Gi", min=1, max=1), _tpu_slice_group()),
    ),
)


def serve_env() -> list[tuple[str, str]]:
    """configs/serve.env's settings, by the rules scripts/serve.sh and tests/conftest.py read
    them (NAME=value lines; comments skipped)."""
    text = (REPO / "configs" / "serve.env").read_text()
    pattern = r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(.*?)\r?$"
    return [(m[1], m[2]) for m in re.finditer(pattern, text, re.MULTILINE)]


def _env() -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in serve_env()]
    env.append({"name": "MIS_SERVE_CACHE", "value": CACHE_DIR})
    # Every container: an ingress replica may land on any pod with a free CPU, and one without
    # the keys would serve without auth. Required: no pod starts before the Secret exists.
    secret = {"secretKeyRef": {"name": SECRET, "key": SECRET_KEY, "optional": False}}
    env.append({"name": SECRET_KEY, "valueFrom": secret})
    return env


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    probe = {k: v for k, v in spec.items() if k != "path"}
    return {"httpGet": {"path": spec["path"], "port": "serve"}, **probe}


def _resources(cpu: int, memory: str, extra: tuple[tuple[str, str], ...] = ()) -> dict:
    """Requests equal to limits (Guaranteed QoS): KubeRay gives Ray the limits' CPUs and
    accelerators, and the scheduler must reserve exactly those."""
    amounts = {"cpu": str(cpu), "memory": memory, **dict(extra)}
    return {"limits": amounts, "requests": dict(amounts)}


def _container(name: str, image: str, resources: dict) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "env": _env(),
        "ports": [
            {"name": "serve", "containerPort": SERVE_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": resources,
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
    }


def _pod(container: dict[str, Any], group: Group | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if group is not None and group.node_selector:
        spec["nodeSelector"] = dict(group.node_selector)
    if group is not None and group.tolerations:
        spec["tolerations"] = [
            {"key": k, "operator": "Exists", "effect": e} for k, e in group.tolerations
        ]
    # The compilation cache (and the demo checkpoint): kept across container restarts; a
    # shared ReadWriteMany claim in its place lets new pods load what others compiled (README).
    spec["volumes"] = [{"name": "cache", "emptyDir": {"sizeLimit": CACHE_SIZE}}]
    return {"spec": spec}


def _worker(group: Group, image: str) -> dict[str, Any]:
    container = _container(
        "ray-worker", image, _resources(group.cpu, group.memory, group.accelerators)
    )
    # Readiness everywhere: a pod with no Serve proxy (a slice host) fails it and stays out of
    # the Serve Service, as KubeRay's own worker probe would keep it out.
    container["readinessProbe"] = _probe(READINESS)
    if group.serves:
        container["livenessProbe"] = _probe(LIVENESS)
        container["startupProbe"] = _probe(STARTUP)
    # else: KubeRay's liveness probe (the Ray node's health): no proxy to ask on a slice host.
    spec: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.min,
        "minReplicas": group.min,
        "maxReplicas": group.max,
    }
    if group.hosts > 1:
        spec["numOfHosts"] = group.hosts
    spec["rayStartParams"] = {}
    spec["template"] = _pod(container, group)
    return spec


def manifest(target: Target, image_repo: str = IMAGE_REPO) -> dict[str, Any]:
    image = f"{image_repo}:{IMAGE_TAG}{target.image_suffix}"
    head = _container("ray-head", image, _resources(target.head_cpu, target.head_memory))
    # No probes on the head: KubeRay submits the Serve config only once the head pod is ready,
    # so a probe on /health there would wait for itself; KubeRay's own (GCS and raylet health)
    # apply. The head takes no replicas (num-cpus 0) and no Serve traffic.
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": f"mis-serve-{target.name}",
            "labels": {
                "app.kubernetes.io/name": "mis-serve",
                "app.kubernetes.io/instance": target.name,
            },
        },
        "spec": {
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": (REPO / "configs" / target.config).read_text(),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Serve asks for replicas within each deployment's autoscaling_config; Ray's
                # autoscaler adds the pods they need, within each group's min/max.
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": IDLE_TIMEOUT_S,
                    "resources": _resources(1, "1Gi"),
                },
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": _pod(head)},
                "workerGroupSpecs": [_worker(g, image) for g in target.groups],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None  # the embedded Serve config as a block, readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render(target: Target, image_repo: str = IMAGE_REPO) -> str:
    head = (
        f"# Generated by `python -m deploy.manifests` from configs/{target.config} (the Serve\n"
        "# config, verbatim) and configs/serve.env (Ray's environment): edit those and\n"
        f"# regenerate. KubeRay {KUBERAY_VERSION}+, Ray {RAY_VERSION}. README: Deploying on "
        "Kubernetes.\n"
        f"#   kubectl create secret generic {SECRET} --from-literal={SECRET_KEY}=KEY1,KEY2\n"
        f"#   kubectl apply -f deploy/kuberay/rayservice-{target.name}.yaml\n"
    )
    body = yaml.dump(manifest(target, image_repo), Dumper=_Dumper, sort_keys=False, width=100)
    return head + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--image-repo", default=IMAGE_REPO, help="e.g. REGISTRY/mis-serve")
    args = p.parse_args(argv)
    stale = []
    for target in TARGETS:
        path = args.out / f"rayservice-{target.name}.yaml"
        text = render(target, args.image_repo)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale (run python -m deploy.manifests):", *stale, sep="\n  ", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
