"""The application's settings: what `serve run` passes to `build_app` (a config's `args:`).

Grouped by who uses them, each knob with one name, one meaning and one default:

    model:     which checkpoint                                   (ingress, scorers)
    engine:    the engine's own config (models/engine_config.py)   (scorers; limits: ingress)
    fanout:    how the ingress cuts a request into chunk calls     (ingress)
    limits:    what one request and one ingress replica may take   (ingress)
    auth:      API keys                                            (ingress only)
    rerank:    the /v1/rerank prompt                               (ingress)
    placement: multi-host slices                                   (scorers)

Each deployment receives its own part (`ScorerArgs`, `IngressArgs`): the API keys never reach a
scorer replica. On the command line, dotted keys reach into a group:
`serve run serve_app.app:build_app model.path=/models/Qwen3-0.6B engine.mode=prefix`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.config import PRESETS, check_tp_size
from models.engine_config import EngineConfig
from serve_app.rerank import (
    QWEN3_RERANKER_DOCUMENT,
    QWEN3_RERANKER_INSTRUCTION,
    QWEN3_RERANKER_QUERY,
    RerankPrompt,
)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelArgs(_Group):
    path: str | None = Field(
        default=None,
        description="HF checkpoint directory (config.json + safetensors + tokenizer.json). "
        "Default: the RANDOM-WEIGHT demo checkpoint of `demo_preset`, generated on first start.",
    )
    demo_preset: str = Field(default="qwen3-tiny", description=f"One of {sorted(PRESETS)}.")
    name: str | None = Field(
        default=None, description="Name in responses and /v1/models (default: the dir name)."
    )
    served_names: list[str] = Field(
        default=[],
        description="More names a request's `model` may give (like vLLM's --served-model-name), "
        'e.g. ["Qwen/Qwen3-0.6B", "rerank-v3.5"]; /v1/models lists them all.',
    )
    adapters: dict[str, str] = Field(
        default={},
        description="LoRA adapters of this model (peft's adapter_config.json + "
        "adapter_model.safetensors directory) by the name a request's `model` picks one with; "
        "their chunks share forwards with every other's. engine.max_adapters of them are "
        "resident on the device at once (default: all of them).",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelArgs:
        if self.demo_preset not in PRESETS:
            raise ValueError(f"demo_preset {self.demo_preset!r} is not one of {sorted(PRESETS)}")
        for name in self.adapters:
            if name in self.served_names or name == self.name or not name:
                raise ValueError(f"adapters: {name!r} is also the base model's name")
        return self


class FanoutArgs(_Group):
    chunk_items: int = Field(
        default=64,
        ge=1,
        description="Items per chunk: a request of more is cut into chunks scored concurrently "
        "(on several replicas when they are free). One replica packs the chunks of every "
        "request it holds into shared forwards whatever this is.",
    )
    chunk_tokens: int = Field(
        default=4096, ge=1, description="Item tokens per chunk (a chunk ends at either limit)."
    )
    retries: int = Field(
        default=2,
        ge=0,
        description="Times a chunk is retried on another replica when its replica dies; then 503.",
    )


class LimitsArgs(_Group):
    """Per request and per ingress replica. Query, item and label limits are the engine's
    (`engine.max_query_tokens`, `engine.max_item_tokens`, `engine.max_labels`)."""

    max_items_per_request: int = Field(default=2048, ge=1)
    max_body_bytes: int = Field(default=16 * 2**20, ge=1, description="Larger bodies get 413.")
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Per-request deadline: past it the request gets a 504 and its chunks that "
        "have not started are dropped.",
    )
    max_inflight_requests: int = Field(
        default=32,
        ge=1,
        description="Requests one ingress replica works on at once; beyond it a fast 503 with "
        "Retry-After (Serve's max_queued_requests bounds the queues in front of it).",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 503.")
    max_items_per_batch: int = Field(
        default=16384,
        ge=1,
        description="Items of all entries of one POST /v1/score/batch together (400 beyond).",
    )
    forward_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A scorer's engine call must finish within it, not counting time spent "
        "compiling (`warmup: false` compiles on first use); past it the replica's chunks are "
        "retried on others and the replica is replaced (a hung forward). Warm-up compiles every "
        "shape first, so a forward is seconds even on a CPU.",
    )


class AuthArgs(_Group):
    api_keys: list[SecretStr] = Field(
        default=[],
        description="Bearer tokens accepted on every path but /health and the docs (also read "
        "from env MIS_API_KEYS, comma-separated); none: no auth. Never logged.",
    )


class RerankArgs(_Group):
    query_template: str = Field(
        default=QWEN3_RERANKER_QUERY,
        description="The prompt up to the document, with {query} and optionally {instruction} "
        "(default: Qwen3-Reranker's format).",
    )
    document_template: str = Field(
        default=QWEN3_RERANKER_DOCUMENT,
        description="The document part, with {document}; scores are read at its last token.",
    )
    instruction: str = Field(default=QWEN3_RERANKER_INSTRUCTION)
    labels: tuple[str, str] = Field(
        default=("yes", "no"),
        description="(relevant, irrelevant) label texts, one token each; the relevance score is "
        "P(first) under a softmax over the two (a causal LM).",
    )
    auto_truncate: bool = Field(
        default=False,
        description="TEI's --auto-truncate: a TEI /rerank request that does not say `truncate` "
        "has a text over the limit cut (its end) instead of refused (413).",
    )
    class_index: int = Field(
        default=-1,
        description="A classification model with two or more classes: the class whose "
        "probability (softmax over the classes) is the relevance score; default the last. "
        "One class: its sigmoid.",
    )

    @model_validator(mode="after")
    def _check(self) -> RerankArgs:
        self.prompt()
        return self

    def prompt(self) -> RerankPrompt:
        return RerankPrompt(self.query_template, self.document_template, self.instruction)


class PlacementArgs(_Group):
    hosts_per_replica: int = Field(
        default=1,
        ge=1,
        description="Hosts one scorer replica spans (a multi-host slice): one Ray actor per "
        "host joined by jax.distributed; engine.tp_size is then the slice's device count. "
        "Needs the Scorer's placement_group_bundles (one per host) or `tpu_topology`.",
    )
    host_num_cpus: float = Field(
        default=1.0, ge=0, description="CPUs each slice host actor takes from its bundle."
    )
    host_resources: dict[str, float] = Field(
        default={},
        description='Other resources each slice host actor takes from its bundle, e.g. {"TPU": 4}.',
    )
    tpu_topology: str | None = Field(
        default=None,
        description='Multi-host TPU slices: the slice topology (e.g. "4x4"). Each replica then '
        "reserves one whole slice itself (ray.util.tpu.slice_placement_group: all hosts of "
        "one slice, by its slice-name label) instead of using placement_group_bundles.",
    )
    tpu_version: str = Field(default="v6e", description="TPU generation of `tpu_topology`.")


def deployment_identity(app_name: str, session: str | None = None) -> str:
    """Which deployment this is: the Ray cluster instance (its session name, unique per cluster
    start) and the Serve application, as a short digest. Every response carries it
    (`X-MIS-Deployment`), a request that names another is refused (421), and it is part of the
    scoring key of every chunk call: two clusters or two applications on one host never answer
    each other's requests or chunks. `session`: default this process' Ray cluster."""
    if session is None:
        import ray  # here, not at the top: the offline CLI imports this module without Ray

        session = ray.get_runtime_context().get_session_name()
    return hashlib.blake2b(f"{session}/{app_name}".encode(), digest_size=8).hexdigest()


def scoring_key(model: ModelArgs, engine: EngineConfig, deployment: str) -> str:
    """What a scorer must be to answer a chunk: the sender's deployment (deployment_identity)
    and the settings that make two scorers give the same scores (checkpoint and engine), as a
    short digest. An ingress sends it with each chunk and a scorer refuses a chunk for another
    key: Serve's gRPC transport addresses a replica by host and port, and nothing else checks
    that a call reached the replica it was meant for."""
    settings = {
        "deployment": deployment,
        "model": model.model_dump(mode="json"),
        "engine": engine.model_dump(mode="json"),
    }
    data = json.dumps(settings, sort_keys=True).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class ModelEngine(_Group):
    """The checkpoint and the engine's settings: the home of `model` and `engine`, read by the
    app, each of its deployments and the batch job (mis_score/batch.py)."""

    model: ModelArgs = ModelArgs()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="before")
    @classmethod
    def _adapter_slots(cls, data: Any) -> Any:
        """Adapters and no engine.max_adapters: every adapter resident."""
        if not isinstance(data, dict):
            return data
        model, engine = data.get("model") or {}, data.get("engine") or {}
        adapters = (
            model.get("adapters")
            if isinstance(model, dict)
            else getattr(model, "adapters", None)  # ModelArgs; anything else fails its check
        )
        if not adapters:
            return data
        if isinstance(engine, EngineConfig) and "max_adapters" not in engine.model_fields_set:
            engine = engine.model_copy(update={"max_adapters": len(adapters)})
        elif isinstance(engine, dict) and "max_adapters" not in engine:
            engine = {**engine, "max_adapters": len(adapters)}
        return {**data, "engine": engine}


class ScorerArgs(ModelEngine):
    """What a scorer replica gets: AppArgs.scorer_args(), every value from the app's settings
    (each default lives there)."""

    placement: PlacementArgs
    warmup: bool
    call_timeout_s: float = Field(
        gt=0,
        description="limits.request_timeout_s: a slice's hosts must answer a scoring call "
        "within it.",
    )
    forward_timeout_s: float = Field(gt=0, description="limits.forward_timeout_s")


class IngressArgs(ModelEngine):
    """What an ingress replica gets: AppArgs.ingress_args() (`engine` for its limits, checked
    before any fan-out)."""

    fanout: FanoutArgs
    limits: LimitsArgs
    auth: AuthArgs
    rerank: RerankArgs


class IngressUserConfig(_Group):
    """The ScoreIngress deployment's `user_config` (config.yaml `deployments:`), applied in
    place: `serve deploy` of a config where only it changed restarts no replica."""

    adapters: dict[str, str] = Field(
        default={},
        description="LoRA adapters added at run time, by name (as model.adapters): each is "
        "checked by the ingress (a bad new one is refused, logged and named in its 404s; a name "
        "re-pointed at a bad directory keeps its old one; the rest are served), read by each "
        "scorer replica on its first request (that request gets a "
        "503 with Retry-After meanwhile) and dropped from the replicas once no longer listed. "
        "Needs engine.max_adapters >= 1 (the adapters resident on the device at once).",
    )
    check_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest the ingress waits for one adapter's check (its files read on a "
        "thread); one not checked by then (a stuck network mount) is refused, saying so.",
    )


class AppArgs(ModelEngine):
    """Everything `build_app` takes; unknown keys are rejected."""

    fanout: FanoutArgs = FanoutArgs()
    limits: LimitsArgs = LimitsArgs()
    auth: AuthArgs = AuthArgs()
    rerank: RerankArgs = RerankArgs()
    placement: PlacementArgs = PlacementArgs()
    warmup: bool = Field(
        default=True,
        description="Compile every shape the engine can run before a scorer replica is ready "
        "(false: compile on first use; single-host replicas only).",
    )

    @classmethod
    def parse(cls, args: AppArgs | dict[str, Any]) -> AppArgs:
        """Validate, with dotted keys (`engine.mode=prefix`, from the command line) expanded."""
        if isinstance(args, AppArgs):
            return args
        nested: dict[str, Any] = {}
        for key, value in args.items():
            *groups, leaf = key.split(".")
            at = nested
            for g in groups:
                at = at.setdefault(g, {})
                if not isinstance(at, dict):
                    raise ValueError(f"{key}: {g} is not a group of settings")
            at[leaf] = value
        return cls.model_validate(nested)

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        p, tp = self.placement, self.engine.tp_size
        if tp % p.hosts_per_replica:
            raise ValueError(
                f"engine.tp_size {tp} must be a multiple of placement.hosts_per_replica "
                f"{p.hosts_per_replica} (every host of a slice brings the same devices)"
            )
        if p.hosts_per_replica > 1 and not self.warmup:
            raise ValueError(
                "warmup: false is for single-host replicas: a slice's hosts would compile under "
                "limits.forward_timeout_s, which cannot tell their compiles from a hang"
            )
        if self.model.adapters and not self.engine.max_adapters:
            raise ValueError("engine.max_adapters: 0 device slots for model.adapters; at least 1")
        if p.tpu_topology is not None and p.hosts_per_replica < 2:
            raise ValueError(
                "placement.tpu_topology is for multi-host slices: hosts_per_replica >= 2"
            )
        if self.model.path is None:  # the demo model's shape is known now, not only at load
            check_tp_size(PRESETS[self.model.demo_preset], tp)
        return self

    def scorer_args(self) -> ScorerArgs:
        return ScorerArgs(
            model=self.model,
            engine=self.engine,
            placement=self.placement,
            warmup=self.warmup,
            call_timeout_s=self.limits.request_timeout_s,
            forward_timeout_s=self.limits.forward_timeout_s,
        )

    def ingress_args(self) -> IngressArgs:
        return IngressArgs(
            model=self.model,
            engine=self.engine,
            fanout=self.fanout,
            limits=self.limits,
            auth=self.auth,
            rerank=self.rerank,
        )
