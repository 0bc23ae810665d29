"""The scoring engine: exact multi-item scoring (DESIGN.md section 1) in three modes, no Ray.

    serial : one causal row per `query ++ item` (batched rows); the fallback for item_first
    packed : per chunk one stream `[query | item slots]` with the segment mask
    prefix : the query is prefilled once (LRU-cached by its tokens); chunks of items then
             attend to the cached query K/V plus their own slot

Host code only builds small int32 arrays (tokens and O(T) metadata); every array op runs inside
a jitted function keyed by a padded shape bucket, so steady-state traffic compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.segment_attention import build_dense_mask
from models.buckets import ladder_bucket, pow2_bucket, pow2_upto
from models.checkpoint import load_checkpoint
from models.inputs import Chunk, ScoringInputError, check_token_ids, tokenize_request
from models.parallel import (
    kv_cache_sharding,
    param_shardings,
    replicated,
    shard_params,
    to_host,
    tp_config,
    tp_mesh,
)
from models.qwen import AttentionImpl, QwenForScoring, StreamLayout, StreamMeta
from models.tokenizer import TextTokenizer
from serve_app.schema import ScoreRequest, ScoreResponse, Usage

log = logging.getLogger(__name__)

# Smallest buckets: keeping every matmul at >= 64 rows keeps XLA:CPU on one GEMM kernel whose
# per-row results do not depend on the row count (small-M paths reorder the sums).
MIN_HEAD_TOKENS = 64
MIN_SLOTS = 8
MIN_LABELS = 2


class Mode(enum.Enum):
    SERIAL = "serial"
    PACKED = "packed"
    PREFIX = "prefix"


class MaskImpl(enum.Enum):
    """Packed-mode attention. `auto` resolves to `segment`: on CPU it was not slower than
    the dense mask at any length we measured, and only it is exactly isolated when an item
    moves to another slot bucket (dense sums over the whole stream's keys)."""

    DENSE = "dense"
    SEGMENT = "segment"
    AUTO = "auto"


class AttentionKernel(enum.Enum):
    """Who computes the segment mask attention: XLA ops (the fastest on CPU) or the Pallas
    ragged kernel (TPU Mosaic / GPU Triton; TPU interpret mode on CPU, for tests only)."""

    XLA = "xla"
    PALLAS = "pallas"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs; every default lives here."""

    mode: Mode = Mode.PREFIX
    mask_impl: MaskImpl = MaskImpl.AUTO  # packed mode only
    attention_impl: AttentionKernel = AttentionKernel.XLA
    chunk_size: int = 64  # items per packed stream / per prefix batch / serial rows per forward
    dtype: str | None = None  # None: the checkpoint's dtype
    max_batch_tokens: int = 8192  # rows per forward are capped by this token count
    # Multi-item rows (chunks, possibly of different requests) packed into one forward. 1 on a
    # CPU (no gain, and each row count is another compiled shape); raise it on accelerators.
    max_batch_rows: int = 1
    prefix_cache_size: int = 32  # prefix mode: cached query prefills (LRU)
    # Devices one engine spans (tensor parallel, models/parallel.py): jax.devices()[:tp_size];
    # in a multi-process (multi-host) run, every device of every process.
    tp_size: int = 1

    def __post_init__(self) -> None:
        # Accept the enums' string values (CLI, YAML): Mode("prefix") is Mode.PREFIX.
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "mask_impl", MaskImpl(self.mask_impl))
        object.__setattr__(self, "attention_impl", AttentionKernel(self.attention_impl))
        if self.attention_impl is AttentionKernel.PALLAS and self.mask_impl is MaskImpl.DENSE:
            raise ValueError(
                "attention_impl 'pallas' computes the segment mask; mask_impl "
                "'dense' is the XLA baseline: pick one"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_batch_tokens < 1 or self.max_batch_rows < 1 or self.prefix_cache_size < 0:
            raise ValueError(
                "max_batch_tokens and max_batch_rows must be >= 1, prefix_cache_size >= 0"
            )
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")


@dataclasses.dataclass
class _Row:
    """One multi-item stream row: a query and up to chunk_size items of one slot length."""

    query: list[int]
    items: list[list[int]]
    slot_len: int
    label_ids: Sequence[int]
    prefix_kv: Any  # prefix mode: the query's cached prefill; None in packed mode
    dest: tuple[int, list[int]]  # (chunk index, item indices inside that chunk)


@dataclasses.dataclass
class _Batch:
    """Host-side int32 inputs of one forward."""

    layout: StreamLayout
    tokens: np.ndarray  # [B, T]
    pos: np.ndarray  # [B, T]
    item_off: np.ndarray  # [B, T]
    prefix_len: np.ndarray  # [B]
    score_idx: np.ndarray  # [B, S]
    label_ids: np.ndarray  # [B, NL] (padded to a bucket; callers drop the padded columns)


class ScoringEngine:
    """Loads a HF checkpoint and scores requests; thread-compatible, not thread-safe."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model_dir = Path(model_dir)
        self.cfg, params = load_checkpoint(self.model_dir, self.config.dtype)
        self.dtype_name = self.config.dtype or self.cfg.dtype
        self.dtype = jnp.dtype(self.dtype_name)
        tp = self.config.tp_size
        self.mesh = tp_mesh(tp) if tp > 1 or jax.process_count() > 1 else None
        if self.mesh is None:
            self.run_cfg, self.params = self.cfg, jax.device_put(params)
        else:
            self.run_cfg = tp_config(self.cfg, tp)
            self.params = shard_params(params, self.cfg, self.mesh)
            log.info(
                "tensor parallel over %d devices (%s): %d q heads, %d kv heads%s per device",
                tp,
                self.mesh.devices[0].platform,
                self.cfg.num_heads // tp,
                self.run_cfg.num_kv_heads // tp,
                " (repeated)" if self.run_cfg.num_kv_heads > self.cfg.num_kv_heads else "",
            )
        try:
            self.tokenizer: TextTokenizer | None = TextTokenizer.from_model_dir(self.model_dir)
        except FileNotFoundError:
            log.warning("%s has no tokenizer.json: only token-id requests work", model_dir)
            self.tokenizer = None
        self._fns: dict[StreamLayout, Any] = {}
        self._shapes: set[tuple] = set()  # every input shape compiled so far
        # query tokens -> per-layer (K, V) of its prefill, each [layers, 1, P, kv_heads, dim]
        self._prefix_cache: collections.OrderedDict[tuple[int, ...], Any] = (
            collections.OrderedDict()
        )
        self.stats = collections.Counter()

    def reconfigure(self, **changes: Any) -> None:
        """Change run settings (mode, chunk size, ...) in place, keeping the loaded weights and
        every compiled shape; the dtype and tp_size are fixed at load."""
        for fixed in ("dtype", "tp_size"):
            if fixed in changes:
                raise ValueError(f"{fixed} is fixed when the checkpoint is loaded")
        self.config = dataclasses.replace(self.config, **changes)
        self._prefix_cache.clear()

    @property
    def _segment_impl(self) -> AttentionImpl:
        pallas = self.config.attention_impl is AttentionKernel.PALLAS
        return AttentionImpl.PALLAS if pallas else AttentionImpl.SEGMENT

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    # ----------------------------------------------------------------- public API

    def score_request(self, request: ScoreRequest, model_name: str | None = None) -> ScoreResponse:
        """Score a validated `/v1/score` body (text or token ids)."""
        query_ids, items_ids = self.tokenize(request)
        scores = self.score_ids(
            query_ids,
            items_ids,
            request.label_token_ids,
            apply_softmax=request.apply_softmax,
            item_first=request.item_first,
        )
        n_tokens = len(query_ids) + sum(len(it) for it in items_ids)
        return ScoreResponse(
            scores=scores.tolist(),
            model=model_name or str(self.model_dir),
            usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens),
        )

    def tokenize(self, request: ScoreRequest) -> tuple[list[int], list[list[int]]]:
        return tokenize_request(request, self.tokenizer)

    def score_chunks(self, chunks: Sequence[Chunk]) -> list[np.ndarray | ScoringInputError]:
        """Score chunks (possibly of different queries) -> scores [items, labels] per chunk.

        A bad chunk yields its error in its place and does not affect the others. Chunks of one
        query share its prefill; multi-item rows of all chunks that share a shape bucket go
        through one forward (up to `max_batch_rows` rows).
        """
        out: list[np.ndarray | ScoringInputError | None] = [None] * len(chunks)
        partial: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        rows: list[_Row] = []
        for ci, c in enumerate(chunks):
            try:
                check_token_ids(c.query, c.items, c.label_ids, self.vocab_size)
            except ScoringInputError as e:
                out[ci] = e
                continue
            query, items = list(c.query), [list(it) for it in c.items]
            ll = np.zeros((len(items), len(c.label_ids)), np.float32)
            lse = np.zeros((len(items),), np.float32)
            partial[ci] = (ll, lse)
            if not items:
                continue
            if c.item_first or self.config.mode is Mode.SERIAL:
                seqs = [it + query if c.item_first else query + it for it in items]
                ll[:], lse[:] = self._score_serial(seqs, c.label_ids)
            else:
                rows += self._plan_rows(ci, query, items, c.label_ids)
        self._run_rows(rows, partial)
        for ci, (ll, lse) in partial.items():
            out[ci] = _finish(ll, lse, chunks[ci].apply_softmax)
            self.stats["items"] += len(ll)
        return out  # type: ignore[return-value]

    def score_ids(
        self,
        query: Sequence[int],
        items: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        *,
        apply_softmax: bool = False,
        item_first: bool = False,
    ) -> np.ndarray:
        """Scores [len(items), len(label_ids)] (float64) for token-id inputs."""
        chunk = Chunk(
            tuple(query), tuple(map(tuple, items)), tuple(label_ids), apply_softmax, item_first
        )
        (result,) = self.score_chunks([chunk])
        if isinstance(result, ScoringInputError):
            raise result
        return result

    def warmup(
        self,
        query_tokens: tuple[int, int],
        item_tokens: tuple[int, int],
        num_labels: tuple[int, int] = (1, 2),
    ) -> int:
        """Compile every shape bucket that requests inside this envelope can reach, whatever
        their item count: queries of `query_tokens` = (min, max) tokens, items of
        `item_tokens` = (min, max), `num_labels` = (min, max) labels. Afterwards such requests
        compile nothing. Returns the number of shapes compiled."""
        start, before = time.perf_counter(), len(self._shapes)
        q_buckets = _buckets(query_tokens, lambda n: ladder_bucket(n, MIN_HEAD_TOKENS))
        w_buckets = _buckets(item_tokens, slot_bucket)
        for nl in _buckets(num_labels, lambda n: pow2_bucket(n, MIN_LABELS)):
            labels = list(range(nl))
            if self.config.mode is Mode.SERIAL:
                rows_range = (query_tokens[0] + item_tokens[0], query_tokens[1] + item_tokens[1])
                for rb in _buckets(rows_range, lambda n: ladder_bucket(n, MIN_HEAD_TOKENS)):
                    for rows in pow2_upto(self._serial_rows(rb)):
                        self._score_serial([[0] * rb] * rows, labels)
                continue
            head = self.config.mode is Mode.PACKED
            for qb in q_buckets:
                for w in w_buckets:
                    for s in pow2_upto(self.config.chunk_size, MIN_SLOTS):
                        n = min(s, self.config.chunk_size)
                        cap = self._rows_per_forward((qb if head else 0) + s * w)
                        for rows in pow2_upto(min(self.config.max_batch_rows, cap)):
                            chunk = Chunk(tuple([0] * qb), ((0,) * w,) * n, tuple(labels))
                            self.score_chunks([chunk] * rows)
        self._prefix_cache.clear()
        compiled = len(self._shapes) - before
        log.info(
            "warm-up: compiled %d shapes in %.1fs (queries %s tokens, items %s, labels %s)",
            compiled,
            time.perf_counter() - start,
            query_tokens,
            item_tokens,
            num_labels,
        )
        return compiled

    # ----------------------------------------------------------------- modes

    def _rows_per_forward(self, length: int) -> int:
        """Most rows of `length` tokens that fit `max_batch_tokens` (a power of two, >= 1)."""
        cap = max(1, self.config.max_batch_tokens // length)
        return 1 << (cap.bit_length() - 1)

    def _serial_rows(self, row_len: int) -> int:
        return min(pow2_bucket(self.config.chunk_size), self._rows_per_forward(row_len))

    def _score_serial(self, seqs: list[list[int]], label_ids) -> tuple[np.ndarray, np.ndarray]:
        row_len = ladder_bucket(max(len(s) for s in seqs), MIN_HEAD_TOKENS)
        per_forward = self._serial_rows(row_len)
        outs = []
        for start in range(0, len(seqs), per_forward):
            group = seqs[start : start + per_forward]
            rows = pow2_bucket(len(group))
            layout = StreamLayout(head_len=row_len, attention=self._segment_impl)
            batch = _empty_batch(layout, rows, 1, pow2_bucket(len(label_ids), MIN_LABELS))
            batch.label_ids[:, : len(label_ids)] = label_ids
            for r, s in enumerate(group):
                batch.tokens[r, : len(s)] = s
                batch.prefix_len[r] = len(s)
                batch.score_idx[r, 0] = len(s) - 1
            batch.pos[:] = np.arange(row_len)
            ll, lse = self._run(batch)
            outs.append((ll[: len(group), 0, : len(label_ids)], lse[: len(group), 0]))
        return _concat(outs)

    def _plan_rows(self, ci: int, query, items, label_ids) -> list[_Row]:
        """Items are grouped by their own slot-length bucket, then chunked in item order.

        Grouping pads each item only to its own bucket, and it keeps an item's slot shape
        independent of every other item, so changing one item cannot move another item's
        arithmetic onto a different program (isolation is exact, not approximate).
        """
        prefix_kv = self._prefill(query) if self.config.mode is Mode.PREFIX else None
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(slot_bucket(len(it)), []).append(i)
        rows = []
        for slot_len, members in sorted(groups.items()):
            for start in range(0, len(members), self.config.chunk_size):
                idx = members[start : start + self.config.chunk_size]
                rows.append(
                    _Row(query, [items[i] for i in idx], slot_len, label_ids, prefix_kv, (ci, idx))
                )
        return rows

    def _run_rows(self, rows: list[_Row], partial) -> None:
        """Forward rows that share a shape bucket together; scatter results to their chunks."""
        with_head = self.config.mode is Mode.PACKED
        groups: dict[tuple[int, int, int, int], list[_Row]] = {}
        for r in rows:
            key = (
                r.slot_len,
                pow2_bucket(len(r.items), MIN_SLOTS),
                ladder_bucket(len(r.query), MIN_HEAD_TOKENS),
                pow2_bucket(len(r.label_ids), MIN_LABELS),
            )
            groups.setdefault(key, []).append(r)
        for (slot_len, slots, head, labels), members in groups.items():
            length = (head if with_head else 0) + slots * slot_len
            per = min(self.config.max_batch_rows, self._rows_per_forward(length))
            for start in range(0, len(members), per):
                part = members[start : start + per]
                batch = self._pack_rows(part, slots, slot_len, head if with_head else 0, labels)
                prefix_kv = None
                if self.config.mode is Mode.PREFIX:
                    kvs = [r.prefix_kv for r in part]
                    kvs += kvs[:1] * (len(batch.tokens) - len(part))  # padding rows
                    prefix_kv = (
                        kvs[0]
                        if len(kvs) == 1
                        else tuple(jnp.concatenate([kv[i] for kv in kvs], axis=1) for i in (0, 1))
                    )
                ll, lse = self._run(batch, prefix_kv)
                for i, r in enumerate(part):
                    ci, idx = r.dest
                    n = len(idx)
                    partial[ci][0][idx] = ll[i, :n, : len(r.label_ids)]
                    partial[ci][1][idx] = lse[i, :n]

    def _pack_rows(
        self, part: list[_Row], slots: int, slot_len: int, head: int, labels: int
    ) -> _Batch:
        """Row r: `[query (padded to head) | slot per item]`; head = 0 in prefix mode."""
        dense = head > 0 and self.config.mask_impl is MaskImpl.DENSE
        attention = AttentionImpl.DENSE if dense else self._segment_impl
        layout = StreamLayout(head, slots, slot_len, attention)
        b = _empty_batch(layout, pow2_bucket(len(part)), slots, labels)
        for r, row in enumerate(part):
            q = len(row.query)
            b.prefix_len[r] = q
            b.label_ids[r, : len(row.label_ids)] = row.label_ids
            if head:
                b.tokens[r, :q] = row.query
                b.pos[r, :head] = np.arange(head)
            b.pos[r, head:] = q
            for s, item in enumerate(row.items):
                base, n = head + s * slot_len, len(item)
                b.tokens[r, base : base + n] = item
                b.pos[r, base : base + n] = q + np.arange(n)
                b.item_off[r, base : base + n] = np.arange(n)
                b.score_idx[r, s] = base + n - 1
        return b

    def _prefill(self, query: list[int]):
        key = tuple(query)
        cached = self._prefix_cache.get(key)
        if cached is not None:
            self._prefix_cache.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return cached
        self.stats["prefix_misses"] += 1
        head = ladder_bucket(len(query), MIN_HEAD_TOKENS)
        layout = StreamLayout(head_len=head, attention=self._segment_impl, return_kv=True)
        b = _empty_batch(layout, 1, 1, MIN_LABELS)
        b.tokens[0, : len(query)] = query
        b.pos[0] = np.arange(head)
        b.prefix_len[0] = len(query)
        self._note_shape(layout, rows=1)
        fn = self._fn(layout)
        _, _, kv = fn(
            self.params, b.tokens, b.pos, b.item_off, b.prefix_len, None, None, None, None
        )
        if self.config.prefix_cache_size:
            self._prefix_cache[key] = kv
            while len(self._prefix_cache) > self.config.prefix_cache_size:
                self._prefix_cache.popitem(last=False)
        return kv

    # ----------------------------------------------------------------- execution

    def _fn(self, layout: StreamLayout):
        fn = self._fns.get(layout)
        if fn is None:
            model = QwenForScoring(self.run_cfg, layout, self.dtype, self.mesh)

            def forward(
                params,
                tokens,
                pos,
                item_off,
                prefix_len,
                prefix_kv,
                dense_mask,
                score_idx,
                label_ids,
            ):
                meta = StreamMeta(pos=pos, item_off=item_off, prefix_len=prefix_len)
                return model.apply(
                    {"params": params}, tokens, meta, prefix_kv, dense_mask, score_idx, label_ids
                )

            if self.mesh is None:
                fn = jax.jit(forward)
            else:
                # Host inputs replicated on every device (and process); results replicated,
                # the prefill's K/V left split by head for the scoring forwards that read it.
                rep, kv = replicated(self.mesh), kv_cache_sharding(self.mesh)
                params = param_shardings(self.params, self.mesh)
                fn = jax.jit(
                    forward,
                    in_shardings=(params, rep, rep, rep, rep, kv, rep, rep, rep),
                    out_shardings=(rep, rep, kv),
                )
            self._fns[layout] = fn
        return fn

    def _note_shape(self, layout: StreamLayout, rows: int, prefix: int = 0, labels: int = 0):
        """Log each new input shape: each one costs an XLA compilation."""
        key = (layout, rows, prefix, labels)
        if key not in self._shapes:
            self._shapes.add(key)
            self.stats["compiles"] += 1
            log.info(
                "compiling shape #%d: %s, %d rows, prefix %d, %d labels",
                len(self._shapes),
                layout,
                rows,
                prefix,
                labels,
            )

    def _run(self, b: _Batch, prefix_kv=None) -> tuple[np.ndarray, np.ndarray]:
        dense_mask = None
        if b.layout.attention is AttentionImpl.DENSE:
            dense_mask = build_dense_mask(
                b.pos,
                b.item_off,
                b.prefix_len,
                head_len=b.layout.head_len,
                slot_len=b.layout.slot_len,
            )
        prefix = 0 if prefix_kv is None else prefix_kv[0].shape[2]
        self._note_shape(b.layout, len(b.tokens), prefix, b.label_ids.shape[1])
        ll, lse, _ = self._fn(b.layout)(
            self.params,
            b.tokens,
            b.pos,
            b.item_off,
            b.prefix_len,
            prefix_kv,
            dense_mask,
            b.score_idx,
            b.label_ids,
        )
        self.stats["forwards"] += 1
        return to_host(ll), to_host(lse)


def _buckets(bounds: tuple[int, int], bucket) -> list[int]:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"bad warm-up range {bounds}: need 1 <= min <= max")
    return sorted({bucket(n) for n in range(lo, hi + 1)})


def slot_bucket(n: int) -> int:
    """Slot length for an item of n tokens: 8, 16, 24, 32, 48, 64, 96, ... (multiples of 8
    keep every slot aligned to the CPU's vector width)."""
    return 8 if n <= 8 else ladder_bucket(n, 16)


def _empty_batch(layout: StreamLayout, rows: int, slots: int, labels: int) -> _Batch:
    t = layout.length
    return _Batch(
        layout=layout,
        tokens=np.zeros((rows, t), np.int32),
        pos=np.zeros((rows, t), np.int32),
        item_off=np.full((rows, t), -1, np.int32),
        prefix_len=np.ones((rows,), np.int32),
        score_idx=np.zeros((rows, slots), np.int32),
        label_ids=np.zeros((rows, labels), np.int32),
    )


def _concat(outs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _finish(label_logits: np.ndarray, lse: np.ndarray, apply_softmax: bool) -> np.ndarray:
    """Scores from f32 label logits and the full-vocab log-sum-exp (DESIGN.md section 1)."""
    ll = label_logits.astype(np.float64)
    if apply_softmax:
        z = np.exp(ll - ll.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)
    return np.exp(ll - lse.astype(np.float64)[:, None])
