"""Multi-item attention over a flat stream of token blocks: the XLA implementation, the dense
baseline, and the plain reference they are tested against.

The stream is T tokens cut into blocks of `block` tokens. A block holds tokens of one query's
items, of one causal run (a query being prefilled, a serial `query ++ item` row), or a run's
last tokens and then items of that run's query. A token attends to three kinds of keys:

    prefix   its block's prefix range: a query's keys in the KV pool (cached) or in this stream
             (its run, earlier in the stream), seen in full by the block's item tokens
             (`own[b, 0]`: all of the block's tokens, or those after its first sequence when
             the block starts with the query's run).
    own      the block's own range [own_start, own_start + own_len) of this stream: the keys of
             the block's first sequence before the block (a causal run's earlier blocks, a long
             item's earlier blocks), seen in full by that sequence's tokens only (the tokens
             whose local keys start at the block's start: `local_start == 0`). It ends where
             the block starts (own_start + own_len = block_start): the XLA walk reads a
             spanning sequence from its start to each of its rows through the block.
    local    each token's own keys inside its block, causally: [block_start + local_start[t], t].

For an item token that is serial `query ++ item` scoring (the query in full, then the item's own
earlier tokens, never another item), and for a causal run plain causal attention. An item fits
its block, or starts a block and goes on over the next ones (its later blocks read its earlier
part as their own range): items of any length, short ones packed back to back. Work is
O(T x (query + own)), not O(T^2), and no shape depends on a query's or an item's length: ranges
are read tile by tile in loops whose trip counts are data.

Blocks are grouped in tiles of `tile` tokens, and each distinct prefix of a tile is walked once
for all the tile's rows that take it: a query's item tokens score against its keys as one
product per key tile (rows of other prefixes in the tile fold in nothing), so the more of a
tile's blocks share a query, the fewer and bigger the products. A sequence that spans blocks (a
long item, a causal run) is walked the same way, once per tile from its start to its last row
there, each of its rows to itself (its own range and the keys of its own block, causally): one
product per key tile for all of its rows in the tile, not one per block; its rows skip the local
step, which is left to the short items.

Sliding windows (Mistral, Gemma 2/3's sliding layers): with `window` W, a token at position p of
its sequence (`BlockMeta.pos`, its RoPE position) sees only keys at positions p-W+1..p of that
sequence. A prefix key's position is its offset in the prefix (a query starts at position 0), an
own key's is the range's first position (`own[b, 3]`) plus its offset, a local key's is p minus
its distance from the token: still O(blocks + T) metadata.

Exactness: a prefix is walked in big tiles and then small ones (a rule on its length alone), a
spanning sequence in small tiles only, each counted from the range's own start, pool tiles and
stream tiles by the same loop body, so a token's arithmetic does not depend on where its query's
keys sit (pool or stream, at which offset), on which other sequences share the stream or its
tile (a token not taking a range folds in nothing: its state is unchanged to the bit), nor on
which block of a tile its sequence starts in (a spanning sequence starts at a block boundary and
its rows see keys 0..own offset of it, whatever the tile holds: only fully masked tiles come and
go). Whether a sequence spans blocks depends on its length alone. Row sums are dots, not fused
reduces (XLA:CPU rounds a fused reduce differently for different array shapes; its dot does
not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mis_kernels.layout import OWN, POOL, PREFIX, STREAM, TAKES_AFTER_RUN, TAKES_ALL

# Finite so that a fully masked row gives exp(NEG - NEG) = 1 instead of NaN; masked entries are
# zeroed explicitly.
NEG = -1e30
# Big and small key tiles of a range walk (tuned on CPU); a range is read up to a big tile past
# its end, so the KV pool and the stream carry that much padding.
KEY_TILES = (512, 128)


@dataclasses.dataclass(frozen=True)
class BlockMeta:
    """Traced metadata of a stream: O(blocks + T) int32 numbers, never a T x T mask."""

    prefix: jax.Array  # [nb, 3] int32 per block: source (POOL | STREAM), start, len
    own: jax.Array  # [nb, 4] int32 per block: who takes the prefix (TAKES), start, len, pos
    local_start: jax.Array  # [T] int32: index inside its block where a token's local keys start
    pos: jax.Array | None = None  # [T] int32: position in its sequence (sliding windows only)


jax.tree_util.register_dataclass(
    BlockMeta, data_fields=["prefix", "own", "local_start", "pos"], meta_fields=[]
)


def _check(t: int, block: int, tile: int, meta: BlockMeta, window) -> None:
    if tile % block or t % tile:
        raise ValueError(f"{t=} must be a multiple of {tile=}, itself a multiple of {block=}")
    if meta.prefix.shape[0] != t // block or meta.own.shape[0] != t // block:
        raise ValueError(
            f"{meta.prefix.shape=} / {meta.own.shape=}: one prefix and one own range per block "
            f"of {block} tokens ({t=})"
        )
    if window is not None and meta.pos is None:
        raise ValueError("a sliding window needs the tokens' positions (BlockMeta.pos)")


def takes_prefix(flag: jax.Array, local_start: jax.Array) -> jax.Array:
    """Which tokens take their block's prefix, from the block's flag (`own[:, 0]`, broadcast to
    the tokens) and their local starts."""
    return (flag == TAKES_ALL) | ((flag == TAKES_AFTER_RUN) & (local_start > 0))


def visible(
    meta: BlockMeta,
    block: int,
    pool_size: int,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, pool_size + T] bool
    """The mask the kernels implement, over the key space [pool | stream]; `window`: keys a
    token sees at most (itself included), None for no limit."""
    t = meta.local_start.shape[0]
    _check(t, block, block, meta, window)
    tok = jnp.arange(t)
    pre = jnp.repeat(meta.prefix, block, axis=0, total_repeat_length=t)  # [T, 3] per token
    own = jnp.repeat(meta.own, block, axis=0, total_repeat_length=t)  # [T, 4] per token
    first = (tok // block * block + meta.local_start)[:, None]  # first local key of each token
    u = jnp.arange(pool_size + t)[None, :]
    start = jnp.where(pre[:, 0:1] == POOL, pre[:, 1:2], pool_size + pre[:, 1:2])
    takes = takes_prefix(own[:, 0:1], meta.local_start[:, None])
    in_prefix = takes & (u >= start) & (u < start + pre[:, 2:3])
    s = u - pool_size  # stream index of key u
    in_own = (meta.local_start[:, None] == 0) & (s >= own[:, 1:2]) & (s < own[:, 1:2] + own[:, 2:3])
    local = (s >= first) & (s <= tok[:, None])
    if window is not None:
        lowest = (meta.pos - window + 1)[:, None]  # lowest key position each token sees
        in_prefix &= u - start >= lowest
        in_own &= own[:, 3:4] + s - own[:, 1:2] >= lowest
        local &= tok[:, None] - s < window
    return in_prefix | in_own | local


def logits(s: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """Attention logits from raw scores q.k: scaled, then (Gemma 2) soft-capped as HF does,
    `tanh(s * scale / cap) * cap`, before the mask."""
    z = s if scale == 1.0 else s * scale
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
    """Fold one key tile into flash-attention state. carry: (m, l [K, M], o [K, M, D]) over M
    rows (tokens x query heads of a kv head); s [K, M, Kt] scaled scores; v [K, Kt, D]; live
    [..., Kt] broadcastable to s, or None: every key live for every row (the same values as
    an all-true mask, without its two passes over the tile)."""
    m, l_sum, o = carry
    if live is not None:
        s = jnp.where(live, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if live is not None:
        p = jnp.where(live, p, 0.0)
    alpha = jnp.exp(m - m_new)
    ones = jnp.ones((s.shape[-1],), p.dtype)
    l_new = l_sum * alpha + jnp.einsum("kmp,p->km", p, ones)
    pv = jnp.einsum("kmp,kpd->kmd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, o * alpha[..., None] + pv


_CHUNK = 8  # relative distances per step of the local part's sum


def _local_step(carry, q, k, v, local_start, softcap=None, window=None):
    """Fold a block's own keys (token t sees [local_start[t], t] of its block) into the
    flash-attention state, in relative coordinates: column j of the skewed scores is the key j
    tokens back, so a token's terms sit at the same places (and are summed in the same order)
    wherever its item starts in the block. Summed in absolute key order instead, XLA:CPU's
    vectorised reductions round differently for different offsets (seen at head_dim 16), and
    changing one item's length would change the bits of the items after it.
    carry: (m, l [K, R*G], o [K, R*G, D]); q [K, R*G, D] (scaled); k, v [R, K, D];
    local_start [R]."""
    m, l_sum, o = carry
    nk, rows, d = q.shape
    r = k.shape[0]
    g = rows // r
    s = jnp.einsum("kmd,pkd->kmp", q, k, preferred_element_type=jnp.float32)
    s = logits(s, 1.0, softcap).reshape(nk, r, g, r)
    # _CHUNK more relative columns than keys, never live, so the sum's last chunk stays in
    # bounds. Made here, not by padding p: a pad fused with the exp below made XLA:CPU emit
    # it element by element, unvectorised (a third of the step's time).
    cols = r + _CHUNK
    back = jnp.arange(r)[:, None] - jnp.arange(cols)[None, :]  # [R, C]: key index t - j
    live = back >= local_start[:, None]  # j <= t - local_start[t]
    if window is not None:  # and at most window - 1 tokens back: j < window
        live &= jnp.arange(cols)[None, :] < window
    live = live[None, :, None, :]
    back = jnp.maximum(back, 0)
    s = jnp.where(live, jnp.take_along_axis(s, back[None, :, None, :], axis=-1), NEG)
    s = s.reshape(nk, rows, cols)
    live = jnp.broadcast_to(live, (1, r, g, cols)).reshape(1, rows, cols)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(live, jnp.exp(s - m_new[..., None]), 0.0)  # [K, R*G, C] relative
    alpha = jnp.exp(m - m_new)
    ones = jnp.ones((_CHUNK,), p.dtype)
    width = jnp.max(jnp.arange(r) - local_start) + 1  # the longest local range
    p = p.reshape(nk, r, g, cols)
    # Head-major, so a token's value rows are gathered as whole rows, already in the product's
    # layout: v_pad[:, i + CHUNK] = v[i].
    v_pad = jnp.pad(_head_major(v), [(0, 0), (_CHUNK, 0), (0, 0)])

    def chunk(c, acc):
        l_acc, o_acc = acc
        j0 = c * _CHUNK
        pc = jax.lax.dynamic_slice_in_dim(p, j0, _CHUNK, axis=-1)  # [K, R, G, C]
        idx = jnp.arange(r)[:, None] - j0 - jnp.arange(_CHUNK)[None, :] + _CHUNK  # [R, C]
        vc = jnp.take(v_pad, jnp.maximum(idx, 0), axis=1)  # [K, R, C, D]
        l_acc = l_acc + jnp.einsum("krgc,c->krg", pc, ones).reshape(nk, rows)
        pv = jnp.einsum(
            "krgc,krcd->krgd", pc.astype(v.dtype), vc, preferred_element_type=jnp.float32
        )
        return l_acc, o_acc + pv.reshape(nk, rows, d)

    l_sum, o = jax.lax.fori_loop(
        0, -(-width // _CHUNK), chunk, (l_sum * alpha, o * alpha[..., None])
    )
    return m_new, l_sum, o


def _big_tiles(length, big: int):
    whole, rest = length // big, length % big
    return whole + (rest > big // 2)


def _walk(carry, q, read, start, n_big, length, row_end, softcap, key_tiles, lowest=None):
    """Fold the keys [start, start + length) of a range into `carry` for the rows of q
    [K, M, D] (scaled): `n_big` big tiles, then small tiles for the rest. Row m sees the range's
    keys [0, row_end[m]) (0: a row that does not take the range folds in nothing), so one walk
    serves rows that see different lengths of the same range; a row's keys sit in the same
    tiles, at the same places, whatever `length` is, as long as `n_big` depends on what the row
    sees alone (a prefix: its length; a spanning sequence: 0). `read(i, size)` -> keys and values
    [K, size, D] from the range's index i on. `lowest` [M]: the lowest range offset each row
    sees (sliding window), None for all."""
    big, small = key_tiles
    # Tiles every row sees whole run without a mask (no other sequence's rows, no window
    # cutting): most of a query's keys, for most tiles. Not with a soft-cap: XLA rounds tanh and
    # exp differently in the two steps' fusions, and a row's bits would depend on whether its
    # tile held other rows (Gemma 2's batching test found it).
    seen = jnp.min(row_end) if softcap is None else 0
    if lowest is not None:
        seen = jnp.where(jnp.all(lowest <= 0), seen, 0)

    def walk(carry, tile: int, first, n):
        offsets = jnp.arange(tile, dtype=jnp.int32)

        def step(masked: bool):
            def body(i, carry):
                j = first + i * tile
                kt, vt = read(start + j, tile)
                s = jnp.einsum("kmd,kpd->kmp", q, kt, preferred_element_type=jnp.float32)
                s = logits(s, 1.0, softcap)
                live = None
                if masked:
                    live = (j + offsets)[None, :] < row_end[:, None]  # [M, tile]
                    if lowest is not None:
                        live &= (j + offsets)[None, :] >= lowest[:, None]
                    live = live[None]
                return _online_step(carry, s, vt, live)

            return body

        whole = jnp.clip((seen - first) // tile, 0, n)
        carry = jax.lax.fori_loop(0, whole, step(False), carry)
        return jax.lax.fori_loop(whole, n, step(True), carry)

    carry = walk(carry, big, 0, n_big)
    rest = jnp.maximum(length - n_big * big, 0)
    return walk(carry, small, n_big * big, -(-rest // small))


def block_attention(
    q: jax.Array,  # [T, K, G, D]  T a multiple of `tile`
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    pool_k: jax.Array,  # [K, P, D]  the KV pool, head-major; P >= every range's end + big tile
    pool_v: jax.Array,  # [K, P, D]
    meta: BlockMeta,
    *,
    block: int,
    tile: int,
    key_tiles: tuple[int, int] = KEY_TILES,
    scale: float | None = None,
    softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> jax.Array:  # [T, K, G, D]
    """Flash attention per tile: each distinct prefix of the tile's blocks, and each sequence
    that spans its blocks, for all of the rows that take it, as one product per key tile; then
    per block the other rows' own keys causally.
    `scale` multiplies q.k (default 1/sqrt(head_dim)); `softcap` (Gemma 2) caps the scaled
    scores at +-softcap with tanh; `window` (an int32 scalar, may be traced): keys a token sees
    at most, itself included (needs `meta.pos`)."""
    t, nk, g, d = q.shape
    _check(t, block, tile, meta, window)
    q, k, v, pool_k, pool_v = map(jnp.asarray, (q, k, v, pool_k, pool_v))
    meta = jax.tree.map(jnp.asarray, meta)
    big, small = key_tiles
    if big % small:
        raise ValueError(f"key tiles {key_tiles}: the big tile must be a multiple of the small")
    nt, per = t // tile, tile // block
    scale = d**-0.5 if scale is None else scale
    # Head-major like the pool, so one tile read serves both; tiles past the end of the stream
    # read zeros, not a clamped (shifted) window.
    k_pad = jnp.pad(_head_major(k), [(0, 0), (0, big), (0, 0)])
    v_pad = jnp.pad(_head_major(v), [(0, 0), (0, big), (0, 0)])

    def read_stream(i, size: int):
        return tuple(jax.lax.dynamic_slice_in_dim(x, i, size, axis=1) for x in (k_pad, v_pad))

    def read_prefix(source):
        def read(i, size: int):
            # One body for pool and stream tiles: the same arithmetic whichever holds them.
            return jax.lax.cond(
                source == POOL,
                lambda: tuple(
                    jax.lax.dynamic_slice_in_dim(x, i, size, axis=1) for x in (pool_k, pool_v)
                ),
                lambda: read_stream(i, size),
            )

        return read

    # Loop bounds the compiler cannot see: XLA inlines a loop it knows runs once (a stream of
    # one tile, a tile of one block) and then fuses its body with what is around it, which
    # rounds differently from the same body in a loop (a causal run's scores changed in the
    # last bits between a 256- and a 512-token forward). local_start >> 30 is 0 (< block).
    opaque = lambda n: jnp.maximum(n, meta.local_start[0] >> 30)  # noqa: E731
    pos = meta.pos if window is not None else jnp.zeros((t,), jnp.int32)
    own_next = jnp.pad(meta.own[1:], [(0, 1), (0, 0)])  # each block's next block's own range

    # [T, K, G, D] -> [K, T*G, D] once: a kv head's query heads stacked, rows token-major, so
    # every product below reads a plain slice of it.
    # Scaled here, once: a scale applied to each tile's scores is a multiply XLA may move into
    # one product's operand and not another's (a row's bits then depended on its tile).
    q_heads = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q_heads = q_heads.transpose(1, 0, 2, 3).reshape(nk, t * g, d)

    def one_tile(j, out):
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, j * tile, tile, 0)  # noqa: E731
        kk, vv, local_start, tile_pos = (rows(x) for x in (k, v, meta.local_start, pos))
        prefix = jax.lax.dynamic_slice_in_dim(meta.prefix, j * per, per, 0)  # [per, 3]
        own = jax.lax.dynamic_slice_in_dim(meta.own, j * per, per, 0)  # [per, 4]
        qh = jax.lax.dynamic_slice_in_dim(q_heads, j * tile * g, tile * g, 1)  # [K, R*G, D]
        per_row = lambda x: jnp.repeat(x, block * g, total_repeat_length=tile * g)  # noqa: E731
        takes = takes_prefix(per_row(own[:, 0]), jnp.repeat(local_start, g))  # [R*G]
        rows_lowest = None if window is None else jnp.repeat(tile_pos - window + 1, g)
        init = (
            jnp.full((nk, tile * g), NEG, jnp.float32),
            jnp.zeros((nk, tile * g), jnp.float32),
            jnp.zeros((nk, tile * g, d), jnp.float32),
        )

        # A block's first sequence spans blocks when it started in an earlier one (an own
        # range) or goes on in the next (which then reads this block as its own range): a long
        # item or a causal run. Whether a sequence spans depends on its length alone.
        after = jax.lax.dynamic_slice_in_dim(own_next, j * per, per, 0)  # [per, 4]
        spans = (own[:, 2] > 0) | ((after[:, 2] > 0) & (after[:, 1] == own[:, 1]))
        # The rows of such a sequence see its keys from its start to themselves through the
        # tile's walk of its range (the keys of their own block included, causally); the
        # local step is for the other rows. Padding after a block's sequences (local start 0,
        # position 0) is not the sequence: with a window it sees the own range by position and
        # its block's keys by distance, as the reference says.
        idx = jnp.tile(jnp.arange(block), per)  # [R] a token's place in its block
        own_len = jnp.repeat(own[:, 2], block)
        firsts = (local_start == 0) & jnp.repeat(spans, block)  # [R]
        seq = firsts
        if window is not None:
            seq &= tile_pos == jnp.repeat(own[:, 3], block) + own_len + idx
        seq_end = jnp.repeat(jnp.where(seq, own_len + idx + 1, jnp.where(firsts, own_len, 0)), g)

        def one_range(r, carry):
            """Range r of the tile: block r's prefix (r < per) or the sequence that spans
            block r - per, for every row of the tile that takes it, unless an earlier block of
            the tile has the same one (it was walked then). A spanning sequence is walked once
            per tile from its start to its last row there, each row to itself, in small tiles
            only (counted from the sequence's start, whatever the tile: a row's bits depend on
            its place in its sequence alone)."""
            is_own = r >= per
            i = jnp.where(is_own, r - per, r)
            same_prefix = (prefix == prefix[i]).all(axis=1)  # [per] blocks with this prefix
            same_own = (own[:, 1] == own[i, 1]) & spans  # blocks of this sequence
            same = jnp.where(is_own, same_own, same_prefix)
            row_end = jnp.where(
                is_own,
                jnp.where(per_row(same), seq_end, 0),
                jnp.where(takes & per_row(same), prefix[i, 2], 0),
            )
            length = jnp.max(row_end)
            first = (jnp.argmax(same) == i) & (length > 0)
            source = jnp.where(is_own, STREAM, prefix[i, 0])
            start = jnp.where(is_own, own[i, 1], prefix[i, 1])
            n_big = jnp.where(is_own, 0, _big_tiles(length, key_tiles[0]))
            lowest = None
            if window is not None:  # an own key's position: the range's first plus its offset
                lowest = rows_lowest - jnp.where(is_own, own[i, 3], 0)

            def walk(carry):
                read = read_prefix(source)
                return _walk(
                    carry, qh, read, start, n_big, length, row_end, softcap, key_tiles, lowest
                )

            return jax.lax.cond(first, walk, lambda c: c, carry)

        carry = jax.lax.fori_loop(0, opaque(2 * per), one_range, init)

        def one_block(i, out):
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * block * g, block * g, 1)  # noqa: E731
            rb = lambda x: jax.lax.dynamic_slice_in_dim(x, i * block, block, 0)  # noqa: E731
            c = tuple(sl(x) for x in carry)
            # A spanning sequence's rows have seen their keys: their local range is empty (a
            # step that folds in nothing leaves a row's bits as they are).
            ls = jnp.where(rb(seq), block, rb(local_start))
            c = jax.lax.cond(
                jnp.all(ls == block),
                lambda c: c,
                lambda c: _local_step(c, sl(qh), rb(kk), rb(vv), ls, softcap, window),
                c,
            )
            _, l_sum, o = c
            res = (o / l_sum[..., None]).reshape(nk, block, g, d).transpose(1, 0, 2, 3)
            at = j * tile + i * block
            return jax.lax.dynamic_update_slice_in_dim(out, res.astype(out.dtype), at, 0)

        return jax.lax.fori_loop(0, opaque(per), one_block, out)

    out = jax.lax.fori_loop(0, opaque(nt), one_tile, jnp.zeros((t, nk, g, d), jnp.float32))
    return out.astype(q.dtype)


def prefix_array(rows: list[tuple[int, int, int]]) -> np.ndarray:
    """Host helper: per-tile prefixes as the int32 [nt, 3] array `BlockMeta.prefix` holds."""
    return np.asarray(rows, np.int32).reshape(-1, len(PREFIX))


def own_array(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Host helper: per-block own ranges as the int32 [nb, 4] array `BlockMeta.own` holds."""
    return np.asarray(rows, np.int32).reshape(-1, len(OWN))
