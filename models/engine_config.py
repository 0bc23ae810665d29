"""What an engine is asked to be (EngineConfig) and the choices it names, importable without
JAX: the ingress checks requests against these limits and the scoring key hashes them, and an
ingress process never loads JAX, Flax or the model (models/engine.py builds the engine)."""

from __future__ import annotations

import enum
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.plan import Mode

# Fewest rows a matmul gets: XLA:CPU keeps matmuls of >= 64 rows on one GEMM kernel whose
# per-row results do not depend on the row count (its small-M paths reorder the sums), so a
# block of 64 tokens and 64 score positions per LM-head call keep isolation exact.
MIN_ROWS = 64
# Tokens of a tile: the rows whose items share one query prefix and score against its keys as
# one product per key tile (mis_kernels/block_attention.py). Item tokens of one query fill
# tiles together, so a longer tile is a bigger product but more padding where a forward holds
# many queries' items; a forward shorter than a tile is one tile.
TILE = 256
# Longest item by default: a RAG passage or page in its rerank template.
MAX_ITEM_TOKENS = 1024


class Attention(enum.Enum):
    """Who computes block attention: one choice per deployment, resolved once at start."""

    AUTO = "auto"  # the engine picks (models/engine.py: resolve_attention)
    XLA = "xla"  # tiled flash attention in XLA ops (mis_kernels/block_attention.py)
    PALLAS = "pallas"  # the Pallas kernel, TPU Mosaic / GPU Triton (mis_kernels/ragged_attention)
    DENSE = "dense"  # the materialised [T, T] mask baseline (packed mode, no pool)


class EngineConfig(BaseModel):
    """How the engine runs and what it accepts; every engine default lives here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field(default=Mode.PREFIX, description="serial | packed | prefix")
    attention: Attention = Field(
        default=Attention.AUTO,
        description="auto | xla | pallas | dense. auto: resolved once when the engine starts "
        "(resolve_attention). dense: the materialised-mask baseline, packed mode only.",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        default=None, description="Compute dtype (default: the checkpoint's)."
    )
    tp_size: int = Field(default=1, ge=1, description="Devices one engine spans (tensor parallel).")
    max_batch_tokens: int = Field(
        default=8192,
        ge=MIN_ROWS,
        description="Tokens per forward, padding included: the largest compiled shape.",
    )
    max_item_tokens: int = Field(
        default=MAX_ITEM_TOKENS,
        ge=1,
        description=f"Longest item (default {MAX_ITEM_TOKENS}, or what a forward holds beside "
        f"the longest query where that is less). Items of any length up to a forward's: short "
        f"ones are packed "
        f"{MIN_ROWS}-token blocks, a longer one spans blocks; what it costs is its own length.",
    )
    max_query_tokens: int = Field(default=4096, ge=1, description="Longest query.")
    max_labels: int = Field(
        default=32, ge=1, description="Labels per request; also the label columns per forward."
    )
    prefix_pool_tokens: int = Field(
        default=32768,
        ge=1,
        description="prefix mode: tokens of cached query K/V held on the device (LRU).",
    )
    max_adapters: int = Field(
        default=0,
        ge=0,
        description="LoRA adapters resident on the device at once (least recently used ones "
        "are loaded again on demand); 0: the engine runs no adapters and its programs have no "
        "LoRA term.",
    )
    max_lora_rank: int = Field(
        default=64,
        ge=1,
        description="Largest LoRA rank an adapter may have; every adapter's term costs this "
        "rank's products (lower ranks are zero-padded).",
    )

    @property
    def block(self) -> int:
        return MIN_ROWS

    @property
    def tile(self) -> int:
        """TILE tokens, or fewer where max_batch_tokens is no multiple of it (whole blocks)."""
        return math.gcd(TILE, self.max_batch_tokens)

    @property
    def per_tile(self) -> int:
        return self.tile // self.block

    @property
    def max_blocks(self) -> int:
        return self.max_batch_tokens // self.block

    @property
    def limits(self) -> dict[str, int]:
        """What a request may hold, by setting name (models.inputs.check_limits)."""
        return {
            "max_query_tokens": self.max_query_tokens,
            "max_item_tokens": self.max_item_tokens,
            "max_labels": self.max_labels,
        }

    @model_validator(mode="before")
    @classmethod
    def _default_item_limit(cls, data: Any) -> Any:
        """No max_item_tokens given: MAX_ITEM_TOKENS, or the blocks a forward has left beside
        the longest query where that is less (a small forward stays a valid setting)."""
        if isinstance(data, dict) and data.get("max_item_tokens") is None:
            fields = cls.model_fields
            forward = data.get("max_batch_tokens", fields["max_batch_tokens"].default)
            query = data.get("max_query_tokens", fields["max_query_tokens"].default)
            if isinstance(forward, int) and isinstance(query, int) and forward > 0:
                room = (forward // MIN_ROWS - -(-query // MIN_ROWS)) * MIN_ROWS
                data = {**data, "max_item_tokens": max(min(MAX_ITEM_TOKENS, room), 1)}
        return data

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_batch_tokens % self.block:
            raise ValueError(
                f"max_batch_tokens {self.max_batch_tokens} must be a multiple of {self.block} "
                "(the stream's blocks)"
            )
        # A forward holds a query's run and then one of its items from a block boundary (or one
        # run of both: serial mode, item_first).
        q, item = self.max_query_tokens, self.max_item_tokens
        need = -(-q // self.block) + -(-item // self.block)
        if need > self.max_blocks:
            raise ValueError(
                f"max_query_tokens {q} and max_item_tokens {item} must fit one forward of "
                f"max_batch_tokens {self.max_batch_tokens} ({need} blocks of {self.block} "
                f"needed, {self.max_blocks} there)"
            )
        if self.mode is Mode.PREFIX and self.max_query_tokens > self.prefix_pool_tokens:
            raise ValueError(
                f"prefix_pool_tokens {self.prefix_pool_tokens} must hold the longest query "
                f"(max_query_tokens {self.max_query_tokens})"
            )
        if self.attention is Attention.DENSE and self.mode is not Mode.PACKED:
            raise ValueError("attention 'dense' (the materialised-mask baseline) is packed mode's")
        return self
