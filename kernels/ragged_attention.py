"""Block attention (kernels/block_attention.py) as a Pallas kernel: TPU (Mosaic) and GPU (Triton).

Same function as `block_attention`: a flat stream of blocks, each block attending to a range of
the KV pool, a range of the stream (only keys before a token's own) and its own keys causally.
One program per (query head, block): the block's queries stay in registers (GPU) or VMEM (TPU)
while the pool range and then the stream range are walked tile by tile, in loops whose trip
counts come from the block's ranges, so a block reads exactly the keys it can see: O(T x
(query + block)) work, whatever the pool's size. Then the block's own keys, one tile. GQA: query
head h reads kv head h // group; K/V are never repeated in memory.

Memory: on GPU a program indexes the pool and the stream of its kv head in global memory; on
TPU both stay in HBM (`pl.ANY`) and each tile is copied into a VMEM scratch before use, so the
pool's size is bounded by HBM, not VMEM. The per-block ranges are scalars (SMEM on TPU), the
per-token local starts a [block, 1] int32 vector (the mask is a vector compare).

`kernels.block_attention.block_attention_reference` (the mask materialised) is the reference;
tests compare both lowerings to it in interpret mode on CPU and natively where a GPU or TPU is
present.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.block_attention import NEG, BlockMeta

_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def _step(q, k, v, mask, m_prev, l_prev, acc_prev, scale):
    """One key tile of flash attention: fold scores q @ k^T (masked) into (m, l, acc)."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [R, tile]
    s = jnp.where(mask, s * scale, NEG)
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_next, l_next, alpha * acc_prev + pv


def _body(ranges, local, q, read, *, block: int, tile: int, scale: float):
    """The kernel's math, shared by both lowerings. `ranges` = the block's four scalars,
    `local` [R, 1] int32, `q` [R, D]; `read(source, start, size)` -> (k, v) [size, D] with
    source 0 = pool, 1 = stream. Returns the block's output [R, D] float32."""
    b = pl.program_id(1)
    pool_start, pool_len, stream_start, stream_len = ranges
    own = b * block + local  # [R, 1] first local key of each row
    # Unlike the XLA walk (block_attention.py), the tiles here sit on one grid from the range's
    # start, so where the range is cut only adds or drops fully masked tiles: no bit changes.
    stream_len = jnp.clip(jnp.max(own) - stream_start, 0, stream_len)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block, tile), 1)

    def walk(source: int, start, length, carry):
        def step(j, carry):
            k, v = read(source, start + j * tile, tile)
            mask = j * tile + cols < length
            if source == 1:  # stream keys only before each row's own keys
                mask &= start + j * tile + cols < own
            return _step(q, k, v, mask, *carry, scale)

        return jax.lax.fori_loop(0, pl.cdiv(length, tile), step, carry)

    init = (
        jnp.full((block, 1), NEG, jnp.float32),
        jnp.zeros((block, 1), jnp.float32),
        jnp.zeros((block, q.shape[-1]), jnp.float32),
    )
    carry = walk(0, pool_start, pool_len, init)
    carry = walk(1, stream_start, stream_len, carry)
    k, v = read(1, b * block, block)
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    keys = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    _, l_sum, acc = _step(q, k, v, (keys <= rows) & (keys >= local), *carry, scale)
    return acc / l_sum


def _gpu_kernel(
    ranges_ref,  # [4] int32
    local_ref,  # [R, 1] int32
    q_ref,  # [R, D]
    k_ref,  # [T + tile, D]  the stream of this kv head
    v_ref,  # [T + tile, D]
    pool_k_ref,  # [P, D]  the pool of this kv head
    pool_v_ref,  # [P, D]
    o_ref,  # [R, D]
    **kw,
):
    def read(source: int, start, size: int):
        k, v = (pool_k_ref, pool_v_ref) if source == 0 else (k_ref, v_ref)
        rows = pl.ds(start, size)
        return k[rows, :], v[rows, :]

    ranges = tuple(ranges_ref[i] for i in range(4))
    out = _body(ranges, local_ref[...], q_ref[...], read, **kw)
    o_ref[...] = out.astype(o_ref.dtype)


def _tpu_kernel(
    ranges_ref,  # SMEM [nb * 4] int32
    local_ref,  # [R, 1] int32
    q_ref,  # [R, D]
    k_hbm,  # [K, T + tile, D] (HBM)
    v_hbm,
    pool_k_hbm,  # [K, P, D] (HBM)
    pool_v_hbm,
    o_ref,  # [R, D]
    k_buf,  # VMEM [block, D]: one tile of keys
    v_buf,
    *,
    group: int,
    **kw,
):
    h, b = pl.program_id(0), pl.program_id(1)
    kv = h // group

    def read(source: int, start, size: int):
        k, v = (pool_k_hbm, pool_v_hbm) if source == 0 else (k_hbm, v_hbm)
        rows = pl.ds(start, size)
        pltpu.sync_copy(k.at[kv, rows, :], k_buf.at[:size, :])
        pltpu.sync_copy(v.at[kv, rows, :], v_buf.at[:size, :])
        return k_buf[:size, :], v_buf[:size, :]

    ranges = tuple(ranges_ref[b * 4 + i] for i in range(4))
    out = _body(ranges, local_ref[...], q_ref[...], read, **kw)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block", "tile", "backend", "interpret"))
def ragged_block_attention(
    q: jax.Array,  # [T, K, G, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    pool_k: jax.Array,  # [K, P, D]  P >= every pool range's end + tile
    pool_v: jax.Array,  # [K, P, D]
    meta: BlockMeta,
    *,
    block: int,
    tile: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [T, K, G, D]
    """Block attention in Pallas. `backend`: "tpu" (Mosaic) or "gpu" (Triton); default: the
    running backend's, TPU's on CPU. `interpret` (default: on CPU) runs either in Pallas'
    interpreter (the TPU one in TPU interpret mode). `tile`: keys per step of a range walk
    (default: the block, at most 128)."""
    t, nk, group, d = q.shape
    if t % block:
        raise ValueError(f"{t=} must be a multiple of {block=}")
    platform = jax.default_backend()
    backend = backend or ("gpu" if platform in _GPU_BACKENDS else "tpu")
    interpret = platform == "cpu" if interpret is None else interpret
    tile = tile or min(block, 128)
    if block % tile:
        raise ValueError(f"{block=} must be a multiple of {tile=}")
    hq, nb = nk * group, t // block
    qh = q.reshape(t, hq, d).swapaxes(0, 1)  # [Hq, T, D]
    # Head-major like the pool; a tile read past the stream's end reads zeros.
    kh = jnp.pad(k.swapaxes(0, 1), [(0, 0), (0, tile), (0, 0)])
    vh = jnp.pad(v.swapaxes(0, 1), [(0, 0), (0, tile), (0, 0)])
    local = meta.local_start.reshape(t, 1)
    kw = dict(block=block, tile=tile, scale=d**-0.5)
    q_spec = pl.BlockSpec((None, block, d), lambda h, b, *_: (h, b, 0))
    local_spec = pl.BlockSpec((block, 1), lambda h, b, *_: (b, 0))
    out_shape = jax.ShapeDtypeStruct((hq, t, d), q.dtype)
    if backend == "gpu":
        per_head = lambda n: pl.BlockSpec((None, n, d), lambda h, b: (h // group, 0, 0))  # noqa: E731
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, **kw),
            out_shape=out_shape,
            grid=(hq, nb),
            in_specs=[
                pl.BlockSpec((None, 4), lambda h, b: (b, 0)),
                local_spec,
                q_spec,
                per_head(kh.shape[1]),
                per_head(kh.shape[1]),
                per_head(pool_k.shape[1]),
                per_head(pool_k.shape[1]),
            ],
            out_specs=q_spec,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret,
            name="ragged_block_attention",
        )(meta.ranges, local, qh, kh, vh, pool_k, pool_v)
    elif backend == "tpu":
        hbm = pl.BlockSpec(memory_space=pl.ANY)
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, group=group, **kw),
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=(hq, nb),
                in_specs=[local_spec, q_spec, hbm, hbm, hbm, hbm],
                out_specs=q_spec,
                scratch_shapes=[pltpu.VMEM((block, d), k.dtype), pltpu.VMEM((block, d), v.dtype)],
            ),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret=pltpu.InterpretParams() if interpret else False,
            name="ragged_block_attention",
        )(meta.ranges.reshape(-1), local, qh, kh, vh, pool_k, pool_v)
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return out.swapaxes(0, 1).reshape(t, nk, group, d)
