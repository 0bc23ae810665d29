"""Ragged segment-mask flash attention in Pallas (TPU Mosaic and GPU Triton), beside its reference.

The token stream is a flat ragged batch: any number of packed sequences sit back to back in one
row (cu_seqlens style), each `query ++ item_0 ++ item_1 ++ ...` with no padding between items.
Keys live in a key space of S positions; query token t's own key is at `t + kv_offset`
(kv_offset = P when a cached prefix of P keys is prepended to the stream's keys, else 0).
Three int32 numbers per token, `meta[..., t, :] = (seq_start, prefix_end, seg_start)`, define

    t sees key u  iff  seq_start <= u <= t + kv_offset  and  (u < prefix_end or u >= seg_start)

i.e. its sequence's query prefix `[seq_start, prefix_end)` plus its own segment up to itself,
causal: exactly serial `query ++ item` scoring for item tokens, plain causal attention for query
tokens (prefix_end = seq_start = seg_start). A token with seq_start > t + kv_offset sees nothing
(padding) and gets zeros.

Work is O(T x (query + item)), not O(T^2): `tile_schedule` turns the metadata into, per query
tile, the list of key tiles that hold any visible key; the kernels visit only those. On TPU the
list is scalar-prefetched into SMEM and drives the key BlockSpec's index map, so skipped tiles
are neither fetched nor computed. The per-token metadata itself reaches the kernel as a VMEM
block (a [block_q, 3] int32 tile): the mask is a vector compare, and a vector needs a vector
load, not block_q scalar reads from SMEM. GQA: query head h reads key/value head h // group, so
K/V are never repeated in memory.

`ragged_attention_reference` is the same function in plain XLA with the T x S mask
materialised; tests compare the kernels against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Finite so that exp(NEG - NEG) is 1, not NaN; masked entries are zeroed explicitly.
_NEG = -1e30
_LANES = 128  # TPU vreg lane count: per-row softmax statistics are kept lane-replicated


def _visible(seq_start, prefix_end, seg_start, t, u, kv_offset: int) -> jax.Array:
    """Mask for token indices `t` and key indices `u`; the metadata broadcasts against `t`."""
    return (u >= seq_start) & (u <= t + kv_offset) & ((u < prefix_end) | (u >= seg_start))


def ragged_attention_reference(
    q: jax.Array,  # [B, Hq, T, D]
    k: jax.Array,  # [B, Hk, S, D]
    v: jax.Array,  # [B, Hk, S, D]
    meta: jax.Array,  # [B, T, 3] int32: seq_start, prefix_end, seg_start
    *,
    kv_offset: int = 0,
) -> jax.Array:  # [B, Hq, T, D]
    """The kernels' function in plain XLA, with the [T, S] mask built from `meta`."""
    b, hq, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    mask = _visible(
        *(meta[:, :, c, None] for c in range(3)),
        jnp.arange(t)[None, :, None],
        jnp.arange(s)[None, None, :],
        kv_offset,
    )  # [B, T, S]
    qg = q.reshape(b, hk, hq // hk, t, d)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * d**-0.5, _NEG)
    m = scores.max(axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(scores - m), 0.0)
    l_sum = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.where(l_sum == 0.0, 1.0, l_sum)
    return o.reshape(b, hq, t, d).astype(q.dtype)


def packed_meta(sequences: list[tuple[int, list[int]]]) -> np.ndarray:
    """Metadata [T, 3] of sequences `(query_len, [item_len, ...])` packed back to back."""
    rows = []
    for query_len, item_lens in sequences:
        base = len(rows)
        rows += [(base, base, base)] * query_len
        seg = base + query_len
        for n in item_lens:
            rows += [(base, base + query_len, seg)] * n
            seg += n
    return np.asarray(rows, np.int32).reshape(-1, 3)


def tile_schedule(
    meta: jax.Array,  # [B, T, 3] int32, T a multiple of block_q
    *,
    kv_offset: int,
    block_q: int,
    block_k: int,
    num_k_tiles: int,
) -> tuple[jax.Array, jax.Array]:
    """Per query tile, the key tiles it must visit: (counts [B, nq], order [B, nq, nk]).

    `order[b, i, :counts[b, i]]` are the visited key tile indices in increasing order. A tile
    is visited when it meets the hull of its tokens' prefix ranges or the hull of their own
    segment ranges (conservative where a tile straddles two sequences; the element mask inside
    the kernel is exact).
    """
    b, t, _ = meta.shape
    nq = t // block_q
    tok = jnp.arange(t, dtype=jnp.int32)[None, :]
    end = tok + kv_offset + 1  # exclusive end of the causal range
    seq_start, prefix_end, seg_start = meta[..., 0], meta[..., 1], meta[..., 2]
    a_lo, a_hi = seq_start, jnp.minimum(prefix_end, end)
    s_lo, s_hi = jnp.maximum(seg_start, seq_start), end

    def hull(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
        live = lo < hi
        big = jnp.iinfo(jnp.int32).max
        lo = jnp.where(live, lo, big).reshape(b, nq, block_q).min(axis=-1)
        hi = jnp.where(live, hi, 0).reshape(b, nq, block_q).max(axis=-1)
        return lo, hi

    k_lo = jnp.arange(num_k_tiles, dtype=jnp.int32) * block_k
    k_hi = k_lo + block_k

    def meets(lo: jax.Array, hi: jax.Array) -> jax.Array:  # -> [B, nq, nk]
        return (k_lo < hi[..., None]) & (k_hi > lo[..., None])

    visit = meets(*hull(a_lo, a_hi)) | meets(*hull(s_lo, s_hi))
    counts = visit.sum(axis=-1).astype(jnp.int32)
    order = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)
    return counts, order


def _online_softmax_step(q, k, v, mask, m_prev, l_prev, acc_prev, scale):
    """One key tile of flash attention: fold scores q @ k^T (masked) into (m, l, acc)."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bq, bk]
    s = jnp.where(mask, s * scale, _NEG)
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_next, l_next, alpha * acc_prev + pv


def _finish(acc: jax.Array, l_sum: jax.Array) -> jax.Array:
    return acc / jnp.where(l_sum == 0.0, 1.0, l_sum)


def _tile_mask(meta_ref, q_tile, k_tile, block_q: int, block_k: int, kv_offset: int):
    """Mask of one [block_q, block_k] tile; metadata columns are read as [block_q, 1] loads
    (Triton needs power-of-two tensor shapes, Mosaic keeps them in sublanes)."""
    t = q_tile * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    u = k_tile * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    return _visible(*(meta_ref[:, c : c + 1] for c in range(3)), t, u, kv_offset)


def _tpu_kernel(
    counts_ref,  # SMEM [B * nq]
    order_ref,  # SMEM [B * nq * nk]
    q_ref,  # [bq, D]
    k_ref,  # [bk, D]
    v_ref,  # [bk, D]
    meta_ref,  # [bq, 3]
    o_ref,  # [bq, D]
    m_sc,  # VMEM [bq, LANES] f32
    l_sc,  # VMEM [bq, LANES] f32
    acc_sc,  # VMEM [bq, D] f32
    *,
    scale: float,
    block_q: int,
    block_k: int,
    kv_offset: int,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < counts_ref[b * nq + i])
    def _step():
        k_tile = order_ref[(b * nq + i) * nk + j]
        mask = _tile_mask(meta_ref, i, k_tile, block_q, block_k, kv_offset)
        m, l_sum, acc = _online_softmax_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            mask,
            m_sc[:, 0:1],
            l_sc[:, 0:1],
            acc_sc[...],
            scale,
        )
        m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_sum, l_sc.shape)
        acc_sc[...] = acc

    @pl.when(j == nk - 1)
    def _store():
        o_ref[...] = _finish(acc_sc[...], l_sc[:, 0:1]).astype(o_ref.dtype)


def _gpu_kernel(
    counts_ref,  # [1]
    order_ref,  # [nk]
    q_ref,  # [bq, D]
    k_ref,  # [S, D]  the whole key sequence of this kv head
    v_ref,  # [S, D]
    meta_ref,  # [bq, 3]
    o_ref,  # [bq, D]
    *,
    scale: float,
    block_q: int,
    block_k: int,
    kv_offset: int,
):
    # Triton programs run in parallel and cannot carry scratch across grid steps, so the walk
    # over the visited key tiles is a loop inside the program instead of a grid axis.
    i = pl.program_id(2)
    q = q_ref[...]

    def body(j, carry):
        k_tile = order_ref[j]
        rows = pl.ds(pl.multiple_of(k_tile * block_k, block_k), block_k)
        mask = _tile_mask(meta_ref, i, k_tile, block_q, block_k, kv_offset)
        return _online_softmax_step(q, k_ref[rows, :], v_ref[rows, :], mask, *carry, scale)

    init = (
        jnp.full((block_q, 1), _NEG, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
    )
    _, l_sum, acc = jax.lax.fori_loop(0, counts_ref[0], body, init)
    o_ref[...] = _finish(acc, l_sum).astype(o_ref.dtype)


def _pad_tokens(x: jax.Array, axis: int, size: int, value: int | float = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(
    jax.jit, static_argnames=("kv_offset", "block_q", "block_k", "backend", "interpret")
)
def ragged_attention(
    q: jax.Array,  # [B, Hq, T, D]
    k: jax.Array,  # [B, Hk, S, D]
    v: jax.Array,  # [B, Hk, S, D]
    meta: jax.Array,  # [B, T, 3] int32: seq_start, prefix_end, seg_start
    *,
    kv_offset: int = 0,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "tpu",
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, T, D]
    """Segment-mask flash attention over a ragged packed stream (see the module docstring).

    `backend` picks the kernel: "tpu" (Mosaic, scalar prefetch) or "gpu" (Triton).
    `interpret=True` runs either on CPU (the TPU one in TPU interpret mode, as
    `pltpu.force_tpu_interpret_mode()` does).
    T and S need not be multiples of the tiles: both are padded here.
    """
    b, hq, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hk}")
    group = hq // hk
    nq, nk = pl.cdiv(t, block_q), pl.cdiv(s, block_k)
    tp, sp = nq * block_q, nk * block_k
    q = _pad_tokens(q, 2, tp)
    k, v = _pad_tokens(k, 2, sp), _pad_tokens(v, 2, sp)
    # Padding tokens start their sequence after themselves: they see nothing.
    pad_start = jnp.arange(tp, dtype=jnp.int32)[None, :, None] + kv_offset + 1
    meta = jnp.where(jnp.arange(tp)[None, :, None] < t, _pad_tokens(meta, 1, tp), pad_start)
    meta = meta.astype(jnp.int32)
    counts, order = tile_schedule(
        meta, kv_offset=kv_offset, block_q=block_q, block_k=block_k, num_k_tiles=nk
    )
    kw = dict(scale=d**-0.5, block_q=block_q, block_k=block_k, kv_offset=kv_offset)
    out_shape = jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype)
    if backend == "tpu":

        def k_map(bi, h, i, j, counts_ref, order_ref):
            # Past the last visited tile, repeat it: the same block index means no new DMA.
            last = jnp.maximum(counts_ref[bi * nq + i] - 1, 0)
            return bi, h // group, order_ref[(bi * nq + i) * nk + jnp.minimum(j, last)], 0

        q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
        kv_spec = pl.BlockSpec((None, None, block_k, d), k_map)
        meta_spec = pl.BlockSpec((None, block_q, 3), lambda bi, h, i, j, *_: (bi, i, 0))
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, **kw),
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(b, hq, nq, nk),
                in_specs=[q_spec, kv_spec, kv_spec, meta_spec],
                out_specs=q_spec,
                scratch_shapes=[
                    pltpu.VMEM((block_q, _LANES), jnp.float32),
                    pltpu.VMEM((block_q, _LANES), jnp.float32),
                    pltpu.VMEM((block_q, d), jnp.float32),
                ],
            ),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
            ),
            interpret=pltpu.InterpretParams() if interpret else False,
            name="ragged_segment_attention",
        )(counts.reshape(-1), order.reshape(-1), q, k, v, meta)
    elif backend == "gpu":
        q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, h, i: (bi, h, i, 0))
        kv_spec = pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // group, 0, 0))
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, **kw),
            out_shape=out_shape,
            grid=(b, hq, nq),
            in_specs=[
                pl.BlockSpec((None, None, 1), lambda bi, h, i: (bi, i, 0)),
                pl.BlockSpec((None, None, nk), lambda bi, h, i: (bi, i, 0)),
                q_spec,
                kv_spec,
                kv_spec,
                pl.BlockSpec((None, block_q, 3), lambda bi, h, i: (bi, i, 0)),
            ],
            out_specs=q_spec,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret,
            name="ragged_segment_attention",
        )(counts[..., None], order, q, k, v, meta)
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return out[:, :, :t]


def stream_segment_attention(
    q: jax.Array,  # [B, T, K, G, D]
    k: jax.Array,  # [B, T, K, D]  the stream's own keys
    v: jax.Array,  # [B, T, K, D]
    prefix_kv: tuple[jax.Array, jax.Array] | None,  # cached query K/V, each [B, P, K, D]
    item_off: jax.Array,  # [B, T] int32: offset inside the item, -1 if none
    prefix_len: jax.Array,  # [B] int32
    *,
    head_len: int,
    block: int | None = None,
) -> jax.Array:  # [B, T, K, G, D]
    """The engine's `[head | item slots]` stream (models/qwen.py) through `ragged_attention`.

    Same mask as `kernels.segment_attention.segment_attention`: head tokens see the query
    causally, item tokens the query plus their own slot. Without `prefix_kv` the query is the
    head region; with it, its keys are prepended to the stream's. The kernel follows the
    default backend; on CPU it runs in TPU interpret mode (slow: for tests).
    """
    b, t, nk, g, d = q.shape
    p = 0
    if prefix_kv is not None:
        p = prefix_kv[0].shape[1]
        k = jnp.concatenate([prefix_kv[0], k], axis=1)
        v = jnp.concatenate([prefix_kv[1], v], axis=1)
    tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    key = tok + p  # each token's own key index
    zero = jnp.zeros_like(key)
    plen = jnp.broadcast_to(prefix_len[:, None], key.shape)
    is_head, is_item = tok < head_len, (item_off >= 0) & (tok >= head_len)
    # Head tokens: the query, causally (no own segment); items: query + own slot; the rest
    # (slot padding) starts after itself and sees nothing.
    seq_start = jnp.where(is_head | is_item, zero, key + 1)
    prefix_end = jnp.where(is_head | is_item, plen, zero)
    seg_start = jnp.where(is_item, key - item_off, jnp.where(is_head, p + t, key + 1))
    meta = jnp.stack([seq_start, prefix_end, seg_start], axis=-1)
    backend = jax.default_backend()
    kernel_backend = "gpu" if backend in ("gpu", "cuda", "rocm") else "tpu"
    block = block or (64 if kernel_backend == "gpu" else 128)
    out = ragged_attention(
        q.reshape(b, t, nk * g, d).swapaxes(1, 2),
        k.swapaxes(1, 2),
        v.swapaxes(1, 2),
        meta,
        kv_offset=p,
        block_q=block,
        block_k=block,
        backend=kernel_backend,
        interpret=backend == "cpu",
    )
    return out.swapaxes(1, 2).reshape(b, t, nk, g, d)
