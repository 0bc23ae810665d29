"""Block attention (mis_kernels/block_attention.py) as a Pallas kernel: TPU (Mosaic), GPU (Triton).

Same function as `block_attention`: a flat stream of blocks, each block attending to its prefix
(a query's keys in the KV pool or in the stream, for the tokens that take it), its own range of
the stream (its first sequence's earlier blocks, for that sequence's tokens only) and its own
keys causally. One program per (kv head, block, group of its query heads): the GQA query
heads that share a kv head are stacked into one tile of up to `rows` rows (an H100 kernel's
usual 128), so each key tile is read once for all of them and every product has at least as
many rows as the block. The rows stay in registers (GPU) or VMEM (TPU) while the prefix and
then the own range are walked tile by tile, in loops whose trip counts come from the block's
ranges, so a block reads exactly the keys it can see: O(T x (query + own)) work, whatever the
pool's size. The tiles every row sees in full (a cached or earlier query: nearly all of the
work) run without a mask; only a range's last tile, and own-range tiles in a block whose later
items do not take them, are masked. Then the block's own keys, one tile, summed in key order:
so unlike the XLA implementation (relative order, `_local_step`) a row's last bits follow its
item's offset in the block, and the kernel is not batch-invariant (README: Modes). Relative
order here needs per-row shifted value rows, which neither Mosaic nor Triton gathers cheaply.

Memory: on GPU a program indexes the pool and the stream of its kv head in global memory; on
TPU both stay in HBM (`pl.ANY`) and each tile is copied into a VMEM scratch before use, so the
pool's size is bounded by HBM, not VMEM. The per-block ranges are scalars (SMEM on TPU), the
per-row local starts a [rows, 1] int32 vector (the mask is a vector compare).

`mis_kernels.block_attention.block_attention_reference` (the mask materialised) is the reference;
tests compare both lowerings to it in interpret mode on CPU and natively where a GPU or TPU is
present. `loadtests/bench_attention.py` times the kernel against the XLA implementation and
sweeps its tile settings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mis_kernels.block_attention import NEG, BlockMeta, logits, takes_prefix
from mis_kernels.layout import OWN, POOL, PREFIX, TAKES_ALL

_GPU_BACKENDS = ("gpu", "cuda", "rocm")
ROWS = 128  # query rows per program, at most: GQA heads are stacked up to this
GPU_KEY_TILE = 64  # keys per step of a range walk on GPU (TPU: up to 128), at most
_SCALARS = len(PREFIX) + len(OWN)  # per block: its prefix, then its own range


def _step(q, k, v, mask, m_prev, l_prev, acc_prev, scale, softcap=None):
    """One key tile of flash attention: fold scores q @ k^T into (m, l, acc). `mask` None: every
    key is visible to every row. Both ways a live key's probability is the same expression,
    exp(s * scale - m), with no select between the product and the difference, so a compiler
    that fuses them into one multiply-add (Triton does by default) fuses them in both."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [R, tile]
    live = logits(s, scale, softcap)
    live = live if mask is None else jnp.where(mask, live, NEG)
    m_next = jnp.maximum(m_prev, live.max(axis=1, keepdims=True))
    p = jnp.exp(logits(s, scale, softcap) - m_next)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a masked key's exp may overflow: replaced, never summed
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_next, l_next, alpha * acc_prev + pv


def _body(ranges, local, q, read, win=None, *, block: int, tile: int, scale: float, softcap=None):
    """The kernel's math, shared by both lowerings. `ranges` = the block's seven scalars (its
    prefix: source, start, len; its own range: who takes the prefix, start, len, pos),
    `local` [R, 1] int32 and `q` [R, D]: R rows = the block's tokens once per query head of the
    program, head after head. `read(source, start, size)` -> (k, v) [size, D] with source 0 =
    pool, 1 = stream. `win` [R, 2] int32 (sliding window, else None): each row's position and
    the lowest key position it sees. Returns the rows' output [R, D] float32."""
    b = pl.program_id(1)
    r = q.shape[0]
    source, prefix_start, prefix_len, takes, own_start, own_len, own_pos = ranges
    takers = takes_prefix(takes, local)  # [R, 1] the rows that take the prefix
    prefix_len = jnp.where(jnp.max(takers.astype(jnp.int32)) > 0, prefix_len, 0)
    firsts = local == 0  # [R, 1] the rows of the block's first sequence: they take its own range
    own_len = jnp.where(jnp.max(firsts.astype(jnp.int32)) > 0, own_len, 0)
    # The tiles sit on one grid from the range's start, so where a range is cut only adds or
    # drops fully masked tiles: no bit of a row depends on the other rows of its block.
    cols = jax.lax.broadcasted_iota(jnp.int32, (r, tile), 1)
    if win is not None:
        lowest = win[:, 1:2]  # [R, 1] lowest key position a row sees
        cut = jnp.max(lowest) > 0  # the window cuts some range key of some row

    def walk(src: int, start, length, key_pos, rows_mask, clean, carry):
        """The range's tiles: the first `clean` ones seen whole by every row, then the rest.
        `key_pos`: the position of the range's first key (sliding window)."""

        def step(masked: bool):
            def body(j, carry):
                k, v = read(src, start + j * tile, tile)
                if not masked:
                    return _step(q, k, v, None, *carry, scale, softcap)
                mask = (j * tile + cols < length) & rows_mask
                if win is not None:
                    mask &= key_pos + j * tile + cols >= lowest
                return _step(q, k, v, mask, *carry, scale, softcap)

            return body

        if win is not None:  # where the window cuts, no tile is seen whole by every row
            clean = jnp.where(cut, 0, clean)
        carry = jax.lax.fori_loop(0, clean, step(False), carry)
        return jax.lax.fori_loop(clean, pl.cdiv(length, tile), step(True), carry)

    init = (
        jnp.full((r, 1), NEG, jnp.float32),
        jnp.zeros((r, 1), jnp.float32),
        jnp.zeros((r, q.shape[-1]), jnp.float32),
    )
    whole = jnp.where(takes == TAKES_ALL, prefix_len // tile, 0)  # tiles every row sees
    carry = jax.lax.cond(
        source == POOL,
        lambda c: walk(0, prefix_start, prefix_len, 0, takers, whole, c),
        lambda c: walk(1, prefix_start, prefix_len, 0, takers, whole, c),
        init,
    )
    whole = jnp.where(jnp.min(firsts.astype(jnp.int32)) > 0, own_len // tile, 0)
    carry = walk(1, own_start, own_len, own_pos, firsts, whole, carry)
    k, v = read(1, b * block, block)
    # A row's place in the block (block: a power of two).
    pos = jax.lax.broadcasted_iota(jnp.int32, (r, block), 0) & (block - 1)
    keys = jax.lax.broadcasted_iota(jnp.int32, (r, block), 1)
    mask = (keys <= pos) & (keys >= local)
    if win is not None:  # at most window - 1 = position - lowest tokens back
        mask &= pos - keys <= win[:, 0:1] - lowest
    _, l_sum, acc = _step(q, k, v, mask, *carry, scale, softcap)
    return acc / l_sum


def _gpu_kernel(
    ranges_ref,  # [7] int32
    local_ref,  # [R, 1] int32
    q_ref,  # [R, D]
    k_ref,  # [T + tile, D]  the stream of this kv head
    v_ref,  # [T + tile, D]
    pool_k_ref,  # [P, D]  the pool of this kv head
    pool_v_ref,  # [P, D]
    *refs,  # [win_ref [R, 2] int32 (sliding window)], o_ref [R, D]
    **kw,
):
    *win_ref, o_ref = refs

    def read(source: int, start, size: int):
        k, v = (pool_k_ref, pool_v_ref) if source == 0 else (k_ref, v_ref)
        rows = pl.ds(start, size)
        return k[rows, :], v[rows, :]

    ranges = tuple(ranges_ref[i] for i in range(_SCALARS))
    win = win_ref[0][...] if win_ref else None
    out = _body(ranges, local_ref[...], q_ref[...], read, win, **kw)
    o_ref[...] = out.astype(o_ref.dtype)


def _tpu_kernel(
    ranges_ref,  # SMEM [nb * 7] int32
    local_ref,  # [R, 1] int32
    q_ref,  # [R, D]
    k_hbm,  # [K, T + tile, D] (HBM)
    v_hbm,
    pool_k_hbm,  # [K, P, D] (HBM)
    pool_v_hbm,
    *refs,  # [win_ref [R, 2] int32 (sliding window)], o_ref [R, D], k_buf, v_buf: VMEM
    # [max(block, tile), D], one tile of keys or the block's own
    programs_per_kv: int,
    **kw,
):
    *win_ref, o_ref, k_buf, v_buf = refs
    kv, b = pl.program_id(0) // programs_per_kv, pl.program_id(1)

    def read(source: int, start, size: int):
        k, v = (pool_k_hbm, pool_v_hbm) if source == 0 else (k_hbm, v_hbm)
        rows = pl.ds(start, size)
        pltpu.sync_copy(k.at[kv, rows, :], k_buf.at[:size, :])
        pltpu.sync_copy(v.at[kv, rows, :], v_buf.at[:size, :])
        return k_buf[:size, :], v_buf[:size, :]

    ranges = tuple(ranges_ref[b * _SCALARS + i] for i in range(_SCALARS))
    win = win_ref[0][...] if win_ref else None
    out = _body(ranges, local_ref[...], q_ref[...], read, win, **kw)
    o_ref[...] = out.astype(o_ref.dtype)


def heads_per_program(group: int, block: int, rows: int) -> int:
    """Query heads of one kv head stacked in a program: the most that fit `rows` rows (at least
    one), a power of two dividing the group (Triton tiles are powers of two)."""
    h = 1
    while group % (2 * h) == 0 and 2 * h * block <= rows:
        h *= 2
    return h


@functools.partial(
    jax.jit,
    static_argnames=(
        "block",
        "tile",
        "rows",
        "num_warps",
        "num_stages",
        "backend",
        "interpret",
        "scale",
        "softcap",
    ),
)
def ragged_block_attention(
    q: jax.Array,  # [T, K, G, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    pool_k: jax.Array,  # [K, P, D]  P >= every pool range's end + tile
    pool_v: jax.Array,  # [K, P, D]
    meta: BlockMeta,
    *,
    block: int,  # a power of two
    tile: int | None = None,
    rows: int = ROWS,
    num_warps: int | None = None,
    num_stages: int = 2,
    backend: str | None = None,
    interpret: bool | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, K, G, D]
    """Block attention in Pallas. `backend`: "tpu" (Mosaic) or "gpu" (Triton); default: the
    running backend's, TPU's on CPU. `interpret` (default: on CPU) runs either in Pallas'
    interpreter (the TPU one in TPU interpret mode). `tile`: keys per step of a range walk, a
    power of two (default: the block, at most GPU_KEY_TILE on GPU and 128 on TPU); the pool
    and the stream are read up to a tile past a range's end, so the pool needs that padding.
    `rows`: query heads are stacked in a program while they fit this many rows
    (heads_per_program; a block larger than `rows` runs one head per program). `num_warps`
    (default: 4 per 64 rows, at most 8) and `num_stages`: Triton's, GPU only. `scale`
    multiplies q.k (default 1/sqrt(head_dim)); `softcap` (Gemma 2) caps the scaled scores;
    `window` (an int32 scalar, may be traced; needs `meta.pos`): keys a token sees at most."""
    t, nk, group, d = q.shape
    if t % block:
        raise ValueError(f"{t=} must be a multiple of {block=}")
    platform = jax.default_backend()
    backend = backend or ("gpu" if platform in _GPU_BACKENDS else "tpu")
    interpret = platform == "cpu" if interpret is None else interpret
    tile = tile or min(block, GPU_KEY_TILE if backend == "gpu" else 128)
    for name, n in (("block", block), ("tile", tile)):
        if n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two")
        if backend == "gpu" and not interpret and n < 16:
            raise ValueError(f"{name}={n}: Triton's matrix products need at least 16")
    nb = t // block
    hp = heads_per_program(group, block, rows)
    per_kv = group // hp  # programs per kv head and block
    r = hp * block
    # [T, K, G, D] -> [K * per_kv, nb, hp * block, D]: a program's rows are contiguous.
    qp = q.reshape(nb, block, nk, per_kv, hp, d).transpose(2, 3, 0, 4, 1, 5)
    qp = qp.reshape(nk * per_kv, nb, r, d)
    # Head-major like the pool; a tile read past the stream's end reads zeros.
    kh = jnp.pad(k.swapaxes(0, 1), [(0, 0), (0, tile), (0, 0)])
    vh = jnp.pad(v.swapaxes(0, 1), [(0, 0), (0, tile), (0, 0)])
    local = jnp.tile(meta.local_start.reshape(nb, 1, block), (1, hp, 1)).reshape(nb, r, 1)
    # Per block: its prefix, then its own range.
    ranges = jnp.concatenate([meta.prefix, meta.own], axis=1).astype(jnp.int32)  # [nb, 7]
    win = ()  # sliding window: per row (position, lowest key position it sees)
    if window is not None:
        if meta.pos is None:
            raise ValueError("a sliding window needs the tokens' positions (BlockMeta.pos)")
        rows = jnp.stack([meta.pos, meta.pos - window + 1], axis=-1).reshape(nb, 1, block, 2)
        win = (jnp.tile(rows, (1, hp, 1, 1)).reshape(nb, r, 2),)
    win_spec = [pl.BlockSpec((None, r, 2), lambda i, b, *_: (b, 0, 0))] * len(win)
    kw = dict(block=block, tile=tile, scale=d**-0.5 if scale is None else scale, softcap=softcap)
    q_spec = pl.BlockSpec((None, None, r, d), lambda i, b, *_: (i, b, 0, 0))
    local_spec = pl.BlockSpec((None, r, 1), lambda i, b, *_: (b, 0, 0))
    out_shape = jax.ShapeDtypeStruct(qp.shape, q.dtype)
    grid = (nk * per_kv, nb)
    if backend == "gpu":
        per_head = lambda n: pl.BlockSpec((None, n, d), lambda i, b: (i // per_kv, 0, 0))  # noqa: E731
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, **kw),
            out_shape=out_shape,
            grid=grid,
            in_specs=[
                pl.BlockSpec((None, _SCALARS), lambda i, b: (b, 0)),
                local_spec,
                q_spec,
                per_head(kh.shape[1]),
                per_head(kh.shape[1]),
                per_head(pool_k.shape[1]),
                per_head(pool_k.shape[1]),
                *win_spec,
            ],
            out_specs=q_spec,
            compiler_params=pltriton.CompilerParams(
                num_warps=num_warps or min(8, 4 * pl.cdiv(r, 64)), num_stages=num_stages
            ),
            interpret=interpret,
            name="ragged_block_attention",
        )(ranges, local, qp, kh, vh, pool_k, pool_v, *win)
    elif backend == "tpu":
        hbm = pl.BlockSpec(memory_space=pl.ANY)
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, programs_per_kv=per_kv, **kw),
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=grid,
                in_specs=[local_spec, q_spec, hbm, hbm, hbm, hbm, *win_spec],
                out_specs=q_spec,
                scratch_shapes=[pltpu.VMEM((max(block, tile), d), x.dtype) for x in (k, v)],
            ),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret=pltpu.InterpretParams() if interpret else False,
            name="ragged_block_attention",
        )(ranges.reshape(-1), local, qp, kh, vh, pool_k, pool_v, *win)
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    out = out.reshape(nk, per_kv, nb, hp, block, d).transpose(2, 4, 0, 1, 3, 5)
    return out.reshape(t, nk, group, d)
