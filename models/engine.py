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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs; every default lives here."""

    mode: Mode = Mode.PREFIX
    mask_impl: MaskImpl = MaskImpl.AUTO  # packed mode only
    chunk_size: int = 64  # items per packed stream / per prefix batch / serial rows per forward
    dtype: str | None = None  # None: the checkpoint's dtype
    max_batch_tokens: int = 8192  # serial mode: rows per forward are capped by this token count
    prefix_cache_size: int = 32  # prefix mode: cached query prefills (LRU)

    def __post_init__(self) -> None:
        # Accept the enums' string values (CLI, YAML): Mode("prefix") is Mode.PREFIX.
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "mask_impl", MaskImpl(self.mask_impl))
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_batch_tokens < 1 or self.prefix_cache_size < 0:
            raise ValueError("max_batch_tokens must be >= 1 and prefix_cache_size >= 0")


@dataclasses.dataclass
class _Batch:
    """Host-side int32 inputs of one forward."""

    layout: StreamLayout
    tokens: np.ndarray  # [B, T]
    pos: np.ndarray  # [B, T]
    item_off: np.ndarray  # [B, T]
    prefix_len: np.ndarray  # [B]
    score_idx: np.ndarray  # [B, S]
    label_ids: np.ndarray  # [B, NL] (padded to a bucket)
    num_labels: int  # real labels; the padded ones are dropped from the results


class ScoringEngine:
    """Loads a HF checkpoint and scores requests; thread-compatible, not thread-safe."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model_dir = Path(model_dir)
        self.cfg, params = load_checkpoint(self.model_dir, self.config.dtype)
        self.dtype_name = self.config.dtype or self.cfg.dtype
        self.dtype = jnp.dtype(self.dtype_name)
        self.params = jax.device_put(params)
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
        """Score chunks (possibly of different queries); a bad chunk yields its error in its
        place and does not affect the others. Chunks of one query share its prefill."""
        out: list[np.ndarray | ScoringInputError] = []
        for c in chunks:
            try:
                out.append(
                    self.score_ids(
                        c.query,
                        c.items,
                        c.label_ids,
                        apply_softmax=c.apply_softmax,
                        item_first=c.item_first,
                    )
                )
            except ScoringInputError as e:
                out.append(e)
        return out

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
        check_token_ids(query, items, label_ids, self.vocab_size)
        if not items:
            return np.zeros((0, len(label_ids)))
        query, items = list(query), [list(it) for it in items]
        if item_first or self.config.mode is Mode.SERIAL:
            seqs = [it + query if item_first else query + it for it in items]
            label_logits, lse = self._score_serial(seqs, label_ids)
        else:
            label_logits, lse = self._score_multi_item(query, items, label_ids)
        self.stats["items"] += len(items)
        return _finish(label_logits, lse, apply_softmax)

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
            for qb in q_buckets:
                for w in w_buckets:
                    for s in pow2_upto(self.config.chunk_size, MIN_SLOTS):
                        items = [[0] * w] * min(s, self.config.chunk_size)
                        self._score_multi_item([0] * qb, items, labels)
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

    def _serial_rows(self, row_len: int) -> int:
        cap = max(1, self.config.max_batch_tokens // row_len)
        return min(pow2_bucket(self.config.chunk_size), 1 << (cap.bit_length() - 1))

    def _score_serial(self, seqs: list[list[int]], label_ids) -> tuple[np.ndarray, np.ndarray]:
        row_len = ladder_bucket(max(len(s) for s in seqs), MIN_HEAD_TOKENS)
        per_forward = self._serial_rows(row_len)
        outs = []
        for start in range(0, len(seqs), per_forward):
            group = seqs[start : start + per_forward]
            rows = pow2_bucket(len(group))
            layout = StreamLayout(head_len=row_len)
            batch = _empty_batch(layout, rows, 1, label_ids)
            for r, s in enumerate(group):
                batch.tokens[r, : len(s)] = s
                batch.prefix_len[r] = len(s)
                batch.score_idx[r, 0] = len(s) - 1
            batch.pos[:] = np.arange(row_len)
            ll, lse = self._run(batch)
            outs.append((ll[: len(group), 0], lse[: len(group), 0]))
        return _concat(outs)

    def _score_multi_item(self, query, items, label_ids) -> tuple[np.ndarray, np.ndarray]:
        """Items are grouped by their own slot-length bucket, then chunked in item order.

        Grouping pads each item only to its own bucket, and it keeps an item's slot shape
        independent of every other item, so changing one item cannot move another item's
        arithmetic onto a different program (isolation is exact, not approximate).
        """
        mode = self.config.mode
        prefix_kv = self._prefill(query) if mode is Mode.PREFIX else None
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(slot_bucket(len(it)), []).append(i)
        label_logits = np.zeros((len(items), len(label_ids)), np.float32)
        lse = np.zeros((len(items),), np.float32)
        for slot_len, members in sorted(groups.items()):
            for start in range(0, len(members), self.config.chunk_size):
                idx = members[start : start + self.config.chunk_size]
                batch = self._pack_chunk(
                    query,
                    [items[i] for i in idx],
                    slot_len,
                    label_ids,
                    with_head=mode is Mode.PACKED,
                )
                ll, ls = self._run(batch, prefix_kv)
                label_logits[idx], lse[idx] = ll[0, : len(idx)], ls[0, : len(idx)]
        return label_logits, lse

    def _pack_chunk(self, query, chunk, slot_len, label_ids, *, with_head: bool) -> _Batch:
        """One stream `[query (padded) | slot per item]`, or only the slots for prefix mode."""
        q = len(query)
        head = ladder_bucket(q, MIN_HEAD_TOKENS) if with_head else 0
        slots = pow2_bucket(len(chunk), MIN_SLOTS)
        dense = with_head and self.config.mask_impl is MaskImpl.DENSE
        attention = AttentionImpl.DENSE if dense else AttentionImpl.SEGMENT
        layout = StreamLayout(head, slots, slot_len, attention)
        b = _empty_batch(layout, 1, slots, label_ids)
        b.prefix_len[0] = q
        if with_head:
            b.tokens[0, :q] = query
            b.pos[0, :head] = np.arange(head)
        b.pos[0, head:] = q
        for s, item in enumerate(chunk):
            base, n = head + s * slot_len, len(item)
            b.tokens[0, base : base + n] = item
            b.pos[0, base : base + n] = q + np.arange(n)
            b.item_off[0, base : base + n] = np.arange(n)
            b.score_idx[0, s] = base + n - 1
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
        layout = StreamLayout(head_len=head, return_kv=True)
        b = _empty_batch(layout, 1, 1, [0])
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
            model = QwenForScoring(self.cfg, layout, self.dtype)

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

            fn = self._fns[layout] = jax.jit(forward)
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
        return np.asarray(ll)[..., : b.num_labels], np.asarray(lse)


def _buckets(bounds: tuple[int, int], bucket) -> list[int]:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"bad warm-up range {bounds}: need 1 <= min <= max")
    return sorted({bucket(n) for n in range(lo, hi + 1)})


def slot_bucket(n: int) -> int:
    """Slot length for an item of n tokens: 8, 16, 24, 32, 48, 64, 96, ... (multiples of 8
    keep every slot aligned to the CPU's vector width)."""
    return 8 if n <= 8 else ladder_bucket(n, 16)


def _empty_batch(layout: StreamLayout, rows: int, slots: int, label_ids) -> _Batch:
    t = layout.length
    labels = np.zeros((rows, pow2_bucket(len(label_ids), MIN_LABELS)), np.int32)
    labels[:, : len(label_ids)] = label_ids
    return _Batch(
        layout=layout,
        tokens=np.zeros((rows, t), np.int32),
        pos=np.zeros((rows, t), np.int32),
        item_off=np.full((rows, t), -1, np.int32),
        prefix_len=np.ones((rows,), np.int32),
        score_idx=np.zeros((rows, slots), np.int32),
        label_ids=labels,
        num_labels=len(label_ids),
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
