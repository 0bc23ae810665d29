"""Segment-mask attention for multi-item scoring: XLA implementations.

A token stream is laid out as a *head* region of `head_len` tokens followed by `num_slots` item
slots of `slot_len` tokens each (an item is left-aligned in its slot, the rest is padding):

    [ head (query, or the whole serial row) | item 0 ... pad | item 1 ... pad | ... ]

Keys come from two places: the *prefix* (the query's keys: the head region itself in packed and
serial mode, a cached query prefill in prefix mode) and the item's own slot. Token t sees

  * prefix key p   iff p < prefix_len and p <= pos[t]           (causal over the query)
  * slot key u     iff u is in t's slot, u <= t and item_off[t] >= 0

so an item token sees the query and its own earlier tokens only, never another item: the
mask of serial `query ++ item` scoring. The mask is never built on the host: it is computed from
O(T) metadata (`pos`, `item_off`, `prefix_len`) inside the jitted function, and the work is
O(T x (prefix + slot_len)), not O(T^2).

Because an item's own keys always sit at the same place relative to its slot, the arithmetic
for one item does not depend on where its slot is or what the other slots hold: results are
bit-identical when another item changes (the isolation contract in DESIGN.md section 1).

`dense_mask_attention` is the materialised-mask baseline: it takes a [B, T, T] mask built on
the host by `build_dense_mask` from the same metadata.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite so that a fully masked row gives exp(NEG - NEG) = 1 instead of NaN; such rows are then
# zeroed explicitly and carry no weight in the log-sum-exp merge.
_NEG = -1e30


def _masked_softmax_parts(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row max, masked exp and row sum of scores `s` ([..., keys]) for an online-softmax merge.

    The row sum is a dot with ones, not a reduce: XLA:CPU fuses a reduce with its neighbours
    and then rounds differently for different array shapes, whereas its dot gives every row
    the same bits whatever the row count (max is exact in any order).
    """
    s = jnp.where(mask, s, _NEG)
    m = s.max(axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    ones = jnp.ones((s.shape[-1],), p.dtype)
    return m, p, jnp.einsum("...k,k->...", p, ones)


def _biased_softmax_parts(s: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_masked_softmax_parts` with the mask as an additive 0 / _NEG bias: one pass fewer over
    the big score tile. Every row must see at least one key (else its exp would be 1, not 0)."""
    s = s + bias
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    ones = jnp.ones((s.shape[-1],), p.dtype)
    return m, p, jnp.einsum("...k,k->...", p, ones)


def _k_minor(x: jax.Array) -> jax.Array:
    """[B, K, T, ...] -> [B, T, K, ...]."""
    return x.swapaxes(1, 2)


# Rows of part A per block: the [rows, keys] score tiles of one block stay near cache size
# (one pass over a 100 MB score array cost more than its matmuls on the CPU).
_BLOCK_ROWS = 256


def _block_rows(unit: int) -> int:
    """Rows per part-A block: a whole number (a power of two, <= 8) of `unit`-row slots, about
    _BLOCK_ROWS rows. It depends on the slot length only, so an item's arithmetic never depends
    on how many other items share its stream."""
    per = max(1, min(8, _BLOCK_ROWS // max(unit, 1)))
    return unit * (1 << (per.bit_length() - 1))


def _prefix_part(
    q: jax.Array,  # [B, N, K, G, D] rows
    prefix_k: jax.Array,  # [B, P, K, D]
    prefix_v: jax.Array,
    bias,  # (first row of the block, rows) -> 0 / _NEG bias broadcastable to [B, K, R, G, P]
    rows: int,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # m, l [B, N, K, G]; o [B, N, K, G, D]
    """Softmax parts of `q` against the prefix keys, `rows` rows at a time (`lax.map`).
    Every row must see at least one prefix key."""
    b, n = q.shape[:2]
    nb = -(-n // rows)
    qb = jnp.pad(q, [(0, 0), (0, nb * rows - n)] + [(0, 0)] * 3)
    qb = qb.reshape(b, nb, rows, *q.shape[2:]).swapaxes(0, 1)  # [nb, B, R, K, G, D]

    def block(args):
        qq, start = args
        # Scores laid out [B, K, R, G, P] (the dot's natural batch-major output), so neither
        # the score tile nor its exp is transposed; only the small outputs are.
        s = jnp.einsum("brkgd,bpkd->bkrgp", qq, prefix_k, preferred_element_type=jnp.float32)
        m, p, l_sum = _biased_softmax_parts(s * scale, bias(start, rows))
        o = jnp.einsum(
            "bkrgp,bpkd->bkrgd",
            p.astype(prefix_v.dtype),
            prefix_v,
            preferred_element_type=jnp.float32,
        )
        return _k_minor(m), _k_minor(l_sum), _k_minor(o)

    starts = jnp.arange(nb, dtype=jnp.int32) * rows
    outs = jax.lax.map(block, (qb, starts))

    def unblock(x: jax.Array) -> jax.Array:
        return x.swapaxes(0, 1).reshape(b, nb * rows, *x.shape[3:])[:, :n]

    return tuple(unblock(x) for x in outs)  # type: ignore[return-value]


def segment_attention(
    q: jax.Array,  # [B, T, K, G, D]  queries, grouped per kv head (G = q heads per kv head)
    k: jax.Array,  # [B, T, K, D]     the stream's own keys
    v: jax.Array,  # [B, T, K, D]
    prefix_k: jax.Array,  # [B, P, K, D]  query keys (head region or cached prefill)
    prefix_v: jax.Array,  # [B, P, K, D]
    pos: jax.Array,  # [B, T] int32   RoPE position of each token
    item_off: jax.Array,  # [B, T] int32  offset of the token inside its item; -1 if none
    prefix_len: jax.Array,  # [B] int32   number of real prefix keys
    *,
    head_len: int,
    num_slots: int,
    slot_len: int,
) -> jax.Array:  # [B, T, K, G, D]
    """Attention with the multi-item segment mask, computed from O(T) metadata.

    Slot tokens come after the whole query (their positions are >= prefix_len), so they see
    every real prefix key; head tokens see the prefix causally by position.
    """
    b, t, nk, g, d = q.shape
    if t != head_len + num_slots * slot_len:
        raise ValueError(f"{t=} must equal {head_len=} + {num_slots=} * {slot_len=}")
    scale = d**-0.5
    out_dtype = q.dtype
    p_idx = jnp.arange(prefix_k.shape[1], dtype=jnp.int32)
    real_key = p_idx[None, :] < prefix_len[:, None]  # [B, P]
    outs = []

    if head_len:
        # Part A only: the head region attends to the prefix causally by position.
        head_pos = jnp.pad(pos[:, :head_len], [(0, 0), (0, -head_len % _BLOCK_ROWS)])

        def head_bias(start, rows):
            pos_blk = jax.lax.dynamic_slice_in_dim(head_pos, start, rows, axis=1)
            mask = real_key[:, None, :] & (p_idx[None, None, :] <= pos_blk[:, :, None])
            return jnp.where(mask, 0.0, _NEG)[:, None, :, None, :]  # [B, 1, R, 1, P]

        m_h, l_h, o_h = _prefix_part(
            q[:, :head_len], prefix_k, prefix_v, head_bias, _BLOCK_ROWS, scale
        )
        outs.append(o_h / l_h[..., None])
    if num_slots:
        # Part A: item tokens against the whole prefix; part B: against their own slot,
        # causal inside the slot; merged by log-sum-exp.
        prefix_bias = jnp.where(real_key, 0.0, _NEG)[:, None, None, None, :]
        m_a, l_a, o_a = _prefix_part(
            q[:, head_len:],
            prefix_k,
            prefix_v,
            lambda start, rows: prefix_bias,
            _block_rows(slot_len),
            scale,
        )

        def slots(x: jax.Array) -> jax.Array:
            return x[:, head_len:].reshape(b, num_slots, slot_len, *x.shape[2:])

        w_idx = jnp.arange(slot_len, dtype=jnp.int32)
        live = slots(item_off) >= 0  # [B, S, W]
        mask_b = (w_idx[None, :] <= w_idx[:, None])[None, None] & live[..., None]  # [B,S,W,W]
        s_b = jnp.einsum(
            "bswkgd,bsukd->bskwgu", slots(q), slots(k), preferred_element_type=jnp.float32
        )
        m_b, p_b, l_b = _masked_softmax_parts(s_b * scale, mask_b[:, :, None, :, None, :])
        o_b = jnp.einsum(
            "bskwgu,bsukd->bskwgd",
            p_b.astype(v.dtype),
            slots(v),
            preferred_element_type=jnp.float32,
        )

        def flat(x: jax.Array) -> jax.Array:  # [B, S, K, W, G(, D)] -> [B, S*W, K, G(, D)]
            x = x.swapaxes(2, 3)
            return x.reshape(b, num_slots * slot_len, *x.shape[3:])

        m_b, l_b, o_b = flat(m_b), flat(l_b), flat(o_b)
        m = jnp.maximum(m_a, m_b)
        ca, cb = jnp.exp(m_a - m), jnp.exp(m_b - m)
        outs.append((o_a * ca[..., None] + o_b * cb[..., None]) / (l_a * ca + l_b * cb)[..., None])
    return jnp.concatenate(outs, axis=1).astype(out_dtype)


def dense_mask_attention(
    q: jax.Array,  # [B, T, K, G, D]
    k: jax.Array,  # [B, T, K, D]
    v: jax.Array,  # [B, T, K, D]
    mask: jax.Array,  # [B, T, T] bool, True where token t may attend to key u
) -> jax.Array:  # [B, T, K, G, D]
    """Plain attention over all T x T pairs with a materialised mask (the slow baseline)."""
    s = jnp.einsum("btkgd,bukd->bktgu", q, k, preferred_element_type=jnp.float32)
    _, p, l_sum = _masked_softmax_parts(s * q.shape[-1] ** -0.5, mask[:, None, :, None, :])
    o = jnp.einsum("bktgu,bukd->bktgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return _k_minor(o / l_sum[..., None]).astype(q.dtype)


def build_dense_mask(
    pos: np.ndarray,  # [B, T] int32
    item_off: np.ndarray,  # [B, T] int32
    prefix_len: np.ndarray,  # [B] int32
    *,
    head_len: int,
    slot_len: int,
) -> np.ndarray:  # [B, T, T] bool
    """The T x T mask `segment_attention` computes implicitly, built on the host."""
    b, t = pos.shape
    u = np.arange(t)
    in_head = u < head_len
    prefix_vis = (
        in_head[None, None, :]
        & (u[None, None, :] < prefix_len[:, None, None])
        & (u[None, None, :] <= pos[:, :, None])
    )
    slot = np.where(in_head, -1, (u - head_len) // max(slot_len, 1))
    own_vis = (
        ~in_head[None, None, :]
        & (slot[None, :, None] == slot[None, None, :])
        & (u[None, None, :] <= u[None, :, None])
        & (item_off[:, :, None] >= 0)
    )
    return prefix_vis | own_vis
