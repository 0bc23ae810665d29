"""Typed arguments of the application builder (`serve run ... key=value` or a config's `args`).

Engine defaults come from `EngineConfig`, so each default is defined once.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.config import PRESETS
from models.engine import AttentionKernel, EngineConfig, MaskImpl, Mode
from models.parallel import check_tp_size
from serve_app.rerank import RerankPrompt

_ENGINE = EngineConfig()


class AppArgs(BaseModel):
    """Everything `build_app` takes; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str | None = Field(
        default=None,
        description="HF checkpoint directory (config.json + safetensors + tokenizer.json). "
        "Default: the RANDOM-WEIGHT demo checkpoint of `demo_preset`, generated on first start.",
    )
    demo_preset: str = Field(default="qwen3-tiny", description=f"One of {sorted(PRESETS)}.")
    model_name: str | None = Field(
        default=None, description="Name in responses and /v1/models (default: the dir name)."
    )
    mode: Mode = Field(default=_ENGINE.mode, description="serial | packed | prefix")
    mask_impl: MaskImpl = Field(default=_ENGINE.mask_impl, description="packed mode: mask")
    attention_impl: AttentionKernel = Field(
        default=_ENGINE.attention_impl,
        description="xla | pallas (the ragged Pallas kernel: TPU or GPU; interpret mode on CPU)",
    )
    chunk_size: int = Field(default=_ENGINE.chunk_size, ge=1, description="Items per chunk.")
    max_chunk_tokens: int = Field(
        default=4096, ge=1, description="Item tokens per chunk (a chunk ends at either limit)."
    )
    dtype: str | None = Field(default=None, description="float32 | bfloat16 (default: saved)")
    max_batch_rows: int = Field(
        default=_ENGINE.max_batch_rows,
        ge=1,
        description="Multi-item rows (chunks of any requests) per forward; 1 suits a CPU.",
    )
    tp_size: int = Field(
        default=_ENGINE.tp_size,
        ge=1,
        description="Devices per scorer replica, the model split over them (tensor parallel). "
        "Give each replica that many accelerators (ray_actor_options resources).",
    )
    hosts_per_replica: int = Field(
        default=1,
        ge=1,
        description="Hosts one scorer replica spans (a multi-host slice): one Ray actor per "
        "host joined by jax.distributed; tp_size is then the slice's device count. Needs the "
        "Scorer's placement_group_bundles, one bundle per host.",
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
    max_items_per_request: int = Field(default=2048, ge=1)
    max_tokens_per_item: int = Field(default=512, ge=1)
    max_query_tokens: int = Field(default=8192, ge=1)
    max_labels: int = Field(default=32, ge=1, description="label_token_ids per request.")
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Per-request deadline: past it the request gets a 504 and its chunks that "
        "have not started are cancelled.",
    )
    max_inflight_requests: int = Field(
        default=32,
        ge=1,
        description="Requests one ingress replica works on at once; beyond it a fast 503 with "
        "Retry-After (Serve's max_queued_requests bounds the queues in front of it).",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 503.")
    max_body_bytes: int = Field(default=16 * 2**20, ge=1, description="Larger bodies get 413.")
    chunk_retries: int = Field(
        default=2,
        ge=0,
        description="Times a chunk is retried on another replica when its replica dies; then 503.",
    )
    rerank_query_template: str = Field(
        default=RerankPrompt.query_template,
        description="/v1/rerank: the prompt up to the document, with {query} and optionally "
        "{instruction} (default: Qwen3-Reranker's format).",
    )
    rerank_document_template: str = Field(
        default=RerankPrompt.document_template,
        description="/v1/rerank: the document part, with {document}; scores are read at its "
        "last token.",
    )
    rerank_instruction: str = Field(default=RerankPrompt.instruction)
    rerank_labels: tuple[str, str] = Field(
        default=("yes", "no"),
        description="/v1/rerank: (relevant, irrelevant) label texts, one token each; the "
        "relevance score is P(first) under a softmax over the two.",
    )
    api_keys: list[SecretStr] = Field(
        default=[],
        description="Bearer tokens accepted on every path but /health and the docs (also read "
        "from env MIS_API_KEYS, comma-separated); none: no auth. Never logged.",
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Chunks a scorer replica takes per batch (@serve.batch)."
    )
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)
    warmup_query_tokens: tuple[int, int] | None = Field(
        default=(1, 128),
        description="Query lengths (min, max) whose shape buckets each replica compiles before "
        "it reports healthy; null: no warm-up.",
    )
    warmup_item_tokens: tuple[int, int] = Field(default=(1, 32))
    warmup_num_labels: tuple[int, int] = Field(default=(1, 2))

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.demo_preset not in PRESETS:
            raise ValueError(f"demo_preset {self.demo_preset!r} is not one of {sorted(PRESETS)}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not float32 or bfloat16")
        if self.tp_size % self.hosts_per_replica:
            raise ValueError(
                f"tp_size {self.tp_size} must be a multiple of hosts_per_replica "
                f"{self.hosts_per_replica} (every host of a slice brings the same devices)"
            )
        if self.tpu_topology is not None and self.hosts_per_replica < 2:
            raise ValueError("tpu_topology is for multi-host slices: set hosts_per_replica >= 2")
        if self.model_path is None:  # the demo model's shape is known now, not only at load
            check_tp_size(PRESETS[self.demo_preset], self.tp_size)
        self.engine_config()  # the engine's own checks, at config time rather than at start
        self.rerank_prompt()
        return self

    def rerank_prompt(self) -> RerankPrompt:
        return RerankPrompt(
            self.rerank_query_template, self.rerank_document_template, self.rerank_instruction
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            mode=self.mode,
            mask_impl=self.mask_impl,
            attention_impl=self.attention_impl,
            chunk_size=self.chunk_size,
            dtype=self.dtype,
            max_batch_rows=self.max_batch_rows,
            tp_size=self.tp_size,
        )
