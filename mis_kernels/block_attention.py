"""Multi-item attention over a flat stream of token blocks: the XLA implementation, the dense
baseline, and the plain reference they are tested against.

The stream is T tokens cut into blocks of `block` tokens. A block holds tokens of one sequence
only (one query's items, or a stretch of one causal run), so everything a block attends to
beyond itself is two key ranges shared by all of its tokens:

    pool range    [pool_start, pool_start + pool_len)       in the KV pool (a cached query)
    stream range  [stream_start, stream_start + stream_len) in this stream (a query run earlier
                  in the stream, or the causal run the block belongs to)

and each token t adds its own keys inside its block, causally:

    local keys    [block_start + local_start[t], t]

where it sees only the stream-range keys before its local keys (key < block_start +
local_start[t]). For an item token that is serial `query ++ item` scoring (the query from the
pool or the stream, then the item's own earlier tokens, never another item), and items may
follow their query run inside the run's last block. For the tokens of a causal run (a query
being prefilled, a serial `query ++ item` row) the stream range is the run itself, local_start
is 0, and the rule gives plain causal attention: the earlier blocks from the range, the block
itself causally. Work is O(T x (query + block)), not O(T^2), and no shape depends on a query's
length: ranges are read tile by tile in loops whose trip counts are data.

Sliding windows (Mistral, Gemma 2/3's sliding layers): with `window` W, a token at position p
of its sequence (`BlockMeta.pos`, its RoPE position) sees only keys at positions p-W+1..p of
that sequence. Both key ranges start at position 0 of the token's sequence (a cached or earlier
query, or the causal run itself), so a range key's position is its offset in the range, and a
local key's is p minus its distance from the token: the window is one more compare on numbers
the kernels already have, still O(blocks + T) metadata.

Exactness: a range is walked in big tiles and then small ones, counted from the range's own
start, pool tiles and stream tiles by the same loop body, so an item's arithmetic does not
depend on where its query's keys sit (pool or stream, at which offset) nor on which other
sequences share the stream. Row
sums are dots, not fused reduces (XLA:CPU rounds a fused reduce differently for different array
shapes; its dot does not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Finite so that a fully masked row gives exp(NEG - NEG) = 1 instead of NaN; masked entries are
# zeroed explicitly.
NEG = -1e30
RANGES = ("pool_start", "pool_len", "stream_start", "stream_len")  # columns of `ranges`


@dataclasses.dataclass(frozen=True)
class BlockMeta:
    """Traced metadata of a stream: O(blocks + T) int32 numbers, never a T x T mask."""

    ranges: jax.Array  # [nb, 4] int32: pool_start, pool_len, stream_start, stream_len
    local_start: jax.Array  # [T] int32: index inside its block where a token's local keys start
    pos: jax.Array | None = None  # [T] int32: position in its sequence (sliding windows only)


jax.tree_util.register_dataclass(
    BlockMeta, data_fields=["ranges", "local_start", "pos"], meta_fields=[]
)


def _check_window(meta: BlockMeta, window) -> None:
    if window is not None and meta.pos is None:
        raise ValueError("a sliding window needs the tokens' positions (BlockMeta.pos)")


def visible(
    meta: BlockMeta, block: int, pool_size: int, window: jax.Array | int | None = None
) -> jax.Array:  # [T, pool_size + T] bool
    """The mask the kernels implement, over the key space [pool | stream]; `window`: keys a
    token sees at most (itself included), None for no limit."""
    t = meta.local_start.shape[0]
    tok = jnp.arange(t)
    r = jnp.repeat(meta.ranges, block, axis=0, total_repeat_length=t)  # [T, 4] per token
    own = (tok // block * block + meta.local_start)[:, None]  # first local key of each token
    u = jnp.arange(pool_size + t)[None, :]
    in_pool = (u >= r[:, 0:1]) & (u < r[:, 0:1] + r[:, 1:2])
    s = u - pool_size  # stream index of key u
    in_stream = (s >= r[:, 2:3]) & (s < r[:, 2:3] + r[:, 3:4]) & (s < own)
    local = (s >= own) & (s <= tok[:, None])
    if window is not None:
        _check_window(meta, window)
        lowest = (meta.pos - window + 1)[:, None]  # lowest key position each token sees
        in_pool &= u - r[:, 0:1] >= lowest
        in_stream &= s - r[:, 2:3] >= lowest
        local &= tok[:, None] - s < window
    return in_pool | in_stream | local


def logits(s: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """Attention logits from raw scores q.k: scaled, then (Gemma 2) soft-capped as HF does,
    `tanh(s * scale / cap) * cap`, before the mask."""
    z = s * scale
    return z if softcap is None else jnp.tanh(z / softcap) * softcap


def _softmax_attention(q, k, v, mask, scale=None, softcap=None) -> jax.Array:
    """q [T, K, G, D], k/v [K, S, D], mask [T, S] -> [T, K, G, D]; rows with no key give 0."""
    s = jnp.einsum("tkgd,ksd->ktgs", q, k, preferred_element_type=jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.where(mask[None, :, None, :], logits(s, scale, softcap), NEG)
    p = jnp.where(mask[None, :, None, :], jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
    ones = jnp.ones((s.shape[-1],), p.dtype)
    l_sum = jnp.einsum("ktgs,s->ktg", p, ones)
    o = jnp.einsum("ktgs,ksd->ktgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]
    return o.transpose(1, 0, 2, 3).astype(q.dtype)


def block_attention_reference(
    q: jax.Array,  # [T, K, G, D]  queries, grouped per kv head (G = q heads per kv head)
    k: jax.Array,  # [T, K, D]     the stream's own keys
    v: jax.Array,  # [T, K, D]
    pool_k: jax.Array,  # [K, P, D]  the KV pool, head-major
    pool_v: jax.Array,  # [K, P, D]
    meta: BlockMeta,
    *,
    block: int,
    scale: float | None = None,
    softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, K, G, D]
    """Plain attention over [pool | stream] with the mask materialised (tests only)."""
    mask = visible(meta, block, pool_k.shape[1], window)
    keys = jnp.concatenate([pool_k, _head_major(k)], axis=1)
    values = jnp.concatenate([pool_v, _head_major(v)], axis=1)
    return _softmax_attention(q, keys, values, mask, scale, softcap)


def dense_attention(
    q: jax.Array,  # [T, K, G, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    meta: BlockMeta,
    *,
    block: int,
    scale: float | None = None,
    softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, K, G, D]
    """The materialised-mask baseline (packed mode, no pool): a [T, T] mask and plain softmax
    attention over every pair of stream tokens, as sglang-jax's packed path does."""
    mask = visible(meta, block, 0, window)
    return _softmax_attention(q, _head_major(k), _head_major(v), mask, scale, softcap)


def _head_major(x: jax.Array) -> jax.Array:
    """[T, K, D] -> [K, T, D]."""
    return x.swapaxes(0, 1)


def _online_step(carry, s, v, live):
    """Fold one key tile into flash-attention state. carry: (m, l [K, R, G], o [K, R, G, D]);
    s [K, R, G, Kt] scaled scores; v [K, Kt, D]; live [..., Kt] broadcastable to s."""
    m, l_sum, o = carry
    s = jnp.where(live, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(live, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    ones = jnp.ones((s.shape[-1],), p.dtype)
    l_new = l_sum * alpha + jnp.einsum("krgp,p->krg", p, ones)
    pv = jnp.einsum("krgp,kpd->krgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, o * alpha[..., None] + pv


_CHUNK = 8  # relative distances per step of the local part's sum


def _local_step(carry, q, k, v, local_start, scale, softcap=None, window=None):
    """Fold a block's own keys (token t sees [local_start[t], t] of its block) into the
    flash-attention state, in relative coordinates: column j of the skewed scores is the key j
    tokens back, so a token's terms sit at the same places (and are summed in the same order)
    wherever its item starts in the block. Summed in absolute key order instead, XLA:CPU's
    vectorised reductions round differently for different offsets (seen at head_dim 16), and
    changing one item's length would change the bits of the items after it.
    q [R, K, G, D]; k, v [R, K, D]; local_start [R]."""
    m, l_sum, o = carry
    r = q.shape[0]
    s = jnp.einsum("rkgd,pkd->krgp", q, k, preferred_element_type=jnp.float32)
    s = logits(s, scale, softcap)
    back = jnp.arange(r)[:, None] - jnp.arange(r)[None, :]  # [R, R]: key index t - j
    live = back >= local_start[:, None]  # j <= t - local_start[t]
    if window is not None:  # and at most window - 1 tokens back: j < window
        live &= jnp.arange(r)[None, :] < window
    live = live[None, :, None, :]
    back = jnp.maximum(back, 0)
    s = jnp.where(live, jnp.take_along_axis(s, back[None, :, None, :], axis=-1), NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(live, jnp.exp(s - m_new[..., None]), 0.0)  # [K, R, G, R] relative
    alpha = jnp.exp(m - m_new)
    ones = jnp.ones((_CHUNK,), p.dtype)
    width = jnp.max(jnp.arange(r) - local_start) + 1  # the longest local range
    p = jnp.pad(p, [(0, 0), (0, 0), (0, 0), (0, _CHUNK)])
    v_pad = jnp.pad(v, [(_CHUNK, 0), (0, 0), (0, 0)])  # v_pad[i + CHUNK] = v[i]

    def chunk(c, acc):
        l_acc, o_acc = acc
        j0 = c * _CHUNK
        pc = jax.lax.dynamic_slice_in_dim(p, j0, _CHUNK, axis=-1)  # [K, R, G, C]
        idx = jnp.arange(r)[:, None] - j0 - jnp.arange(_CHUNK)[None, :] + _CHUNK  # [R, C]
        vc = jnp.take(v_pad, jnp.maximum(idx, 0), axis=0)  # [R, C, K, D]
        l_acc = l_acc + jnp.einsum("krgc,c->krg", pc, ones)
        pv = jnp.einsum(
            "krgc,rckd->krgd", pc.astype(v.dtype), vc, preferred_element_type=jnp.float32
        )
        return l_acc, o_acc + pv

    l_sum, o = jax.lax.fori_loop(
        0, -(-width // _CHUNK), chunk, (l_sum * alpha, o * alpha[..., None])
    )
    return m_new, l_sum, o


def _tile(k: jax.Array, v: jax.Array, start, size: int) -> tuple[jax.Array, jax.Array]:
    """Keys [start, start + size) of head-major [K, S, D] arrays."""
    return tuple(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (k, v))


def _big_tiles(length, big: int):
    whole, rest = length // big, length % big
    return whole + (rest > big // 2)


def block_attention(
    q: jax.Array,  # [T, K, G, D]  T a multiple of `block`
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    pool_k: jax.Array,  # [K, P, D]  the KV pool, head-major; P >= every range's end + big tile
    pool_v: jax.Array,  # [K, P, D]
    meta: BlockMeta,
    *,
    block: int,
    key_tiles: tuple[int, int] = (512, 128),
    scale: float | None = None,
    softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, K, G, D]
    """Flash attention per block: the pool range and the stream range in tiles (whole big
    tiles, then small ones for the rest; one loop each, trip counts from the data), then the
    block's own causal keys. `scale` multiplies q.k (default 1/sqrt(head_dim)); `softcap`
    (Gemma 2) caps the scaled scores at +-softcap with tanh; `window` (an int32 scalar, may be
    traced): keys a token sees at most, itself included (needs `meta.pos`)."""
    t, nk, g, d = q.shape
    if t % block:
        raise ValueError(f"{t=} must be a multiple of {block=}")
    big, small = key_tiles
    if big % small:
        raise ValueError(f"key tiles {key_tiles}: the big tile must be a multiple of the small")
    nb = t // block
    scale = d**-0.5 if scale is None else scale
    # Head-major like the pool, so one tile read serves both; tiles past the end of the stream
    # read zeros, not a clamped (shifted) window.
    k_pad = jnp.pad(_head_major(k), [(0, 0), (0, big), (0, 0)])
    v_pad = jnp.pad(_head_major(v), [(0, 0), (0, big), (0, 0)])

    _check_window(meta, window)

    def one_block(args):
        qq, kk, vv, local_start, rng, b, *pp = args
        pp = pp[0] if pp else None  # [R] the rows' positions (sliding window)
        pool_start, pool_len, stream_start, stream_len = (rng[i] for i in range(4))
        own = b * block + local_start  # [R] first local key of each row
        # Stream keys past this block are never visible: not read at all. Cut at the block's
        # end, not at its rows' own keys: the range's length sets its tiling, hence the order
        # of a row's sums, and must not depend on which other rows share the block (a query's
        # last block tiled its keys differently with and without an item after the query).
        stream_len = jnp.clip((b + 1) * block - stream_start, 0, stream_len)

        def walk(carry, tile: int, pool_from, n_pool, stream_from, n_stream):
            """n_pool tiles of the pool range from offset pool_from, then n_stream tiles of the
            stream range from offset stream_from, `tile` keys each."""
            offsets = jnp.arange(tile, dtype=jnp.int32)

            def step(i, carry):
                # One body for pool and stream tiles: the same arithmetic whichever holds them.
                from_pool = i < n_pool
                j = jnp.where(from_pool, pool_from + i * tile, stream_from + (i - n_pool) * tile)
                start = j + jnp.where(from_pool, pool_start, stream_start)
                length = jnp.where(from_pool, pool_len, stream_len)

                kt, vt = jax.lax.cond(
                    from_pool,
                    lambda: _tile(pool_k, pool_v, start, tile),
                    lambda: _tile(k_pad, v_pad, start, tile),
                )
                s = jnp.einsum("rkgd,kpd->krgp", qq, kt, preferred_element_type=jnp.float32)
                key = start + offsets
                live = (j + offsets < length)[None, :] & (
                    from_pool | (key[None, :] < own[:, None])
                )  # [R, tile]
                if window is not None:  # a range key's position is its offset in the range
                    live &= (j + offsets)[None, :] > (pp - window)[:, None]
                return _online_step(carry, logits(s, scale, softcap), vt, live[None, :, None, :])

            return jax.lax.fori_loop(0, n_pool + n_stream, step, carry)

        init = (
            jnp.full((nk, block, g), NEG, jnp.float32),
            jnp.zeros((nk, block, g), jnp.float32),
            jnp.zeros((nk, block, g, d), jnp.float32),
        )
        # Whole big tiles, one more when more than half of one is left; small tiles for the
        # rest. Any rule works that depends on a range's length alone.
        pool_big, stream_big = _big_tiles(pool_len, big), _big_tiles(stream_len, big)
        carry = walk(init, big, 0, pool_big, 0, stream_big)
        pool_from, stream_from = pool_big * big, stream_big * big
        carry = walk(
            carry,
            small,
            pool_from,
            -(-jnp.maximum(pool_len - pool_from, 0) // small),
            stream_from,
            -(-jnp.maximum(stream_len - stream_from, 0) // small),
        )
        _, l_sum, o = _local_step(carry, qq, kk, vv, local_start, scale, softcap, window)
        return (o / l_sum[..., None]).transpose(1, 0, 2, 3)  # [R, K, G, D]

    out = jax.lax.map(
        one_block,
        (
            q.reshape(nb, block, nk, g, d),
            k.reshape(nb, block, nk, d),
            v.reshape(nb, block, nk, d),
            meta.local_start.reshape(nb, block),
            meta.ranges,
            jnp.arange(nb, dtype=jnp.int32),
            *(() if window is None else (meta.pos.reshape(nb, block),)),
        ),
    )
    return out.reshape(t, nk, g, d).astype(q.dtype)


def ranges_array(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Host helper: per-block ranges as the int32 [nb, 4] array `BlockMeta.ranges` holds."""
    return np.asarray(rows, np.int32).reshape(-1, len(RANGES))
