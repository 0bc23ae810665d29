"""Block attention (mis_kernels/block_attention.py): the mask by hand, the tiled XLA implementation
and the dense baseline against the plain reference, and the exactness the engine relies on."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mis_kernels.block_attention import (
    BlockMeta,
    block_attention,
    block_attention_reference,
    dense_attention,
    own_array,
    prefix_array,
    visible,
)
from mis_kernels.layout import POOL, STREAM, TAKES_AFTER_RUN, TAKES_ALL, TAKES_NONE
from models.inputs import Chunk
from models.plan import Mode, plan
from models.pool import PrefixPool

# Pool of 3 keys (a cached query c0..c2); blocks of 2 tokens:
#   block 0:   a query run q0 q1
#   blocks 1-2: item A (3 tokens) of that query, a long item: its block 2 reads A0 A1 as its own
#              range; item B (1 token) of the same query after it in block 2
#   block 3:   the run r0 of another query, then its item D (1 token) in the same block
#   block 4:   item C (2 tokens) of the cached query
#   blocks 5-6: a causal run s0 s1 s2 (a serial row), then padding
#   block 7:   padding
HAND = BlockMeta(
    prefix_array(
        [(POOL, 0, 0), (STREAM, 0, 2), (STREAM, 0, 2), (STREAM, 6, 1), (POOL, 0, 3)]
        + [(POOL, 0, 0)] * 3
    ),
    own_array(
        [
            (TAKES_NONE, 0, 0, 0),  # q0 q1: the run's first block
            (TAKES_ALL, 2, 0, 2),  # A0 A1: A's first block
            (TAKES_ALL, 2, 2, 2),  # A2 B0: A's earlier tokens, for A's rows only
            (TAKES_AFTER_RUN, 6, 0, 0),  # r0 D0: D takes the prefix, the run does not
            (TAKES_ALL, 8, 0, 3),  # C0 C1
            (TAKES_NONE, 10, 0, 0),  # s0 s1
            (TAKES_NONE, 10, 2, 0),  # s2: the run's earlier tokens
            (TAKES_NONE, 0, 0, 0),
        ]
    ),
    np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], np.int32),
    # q0 q1 | A0 A1 | A2 B0 | r0 D0 | C0 C1 | s0 s1 | s2 pad | pad pad
    np.array([0, 1, 2, 3, 4, 2, 0, 1, 3, 4, 0, 1, 2, 0, 0, 0], np.int32),
)


def test_mask_by_hand():
    got = np.asarray(visible(HAND, block=2, pool_size=3)).astype(int)
    expected = np.array(
        [
            # c0 c1 c2|q0 q1 A0 A1 A2 B0 r0 D0 C0 C1 s0 s1 s2 __ __ __
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q0: causal
            [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q1
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A0: the query, itself
            [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A1
            [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # A2: own range A0 A1
            [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # B0: the query, never A
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # r0: a run, no prefix
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # D0: its query r0, itself
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # C0: the cached query
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],  # C1
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # s0
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # s1
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],  # s2: own range s0 s1
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],  # padding: never read
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # and no token sees it
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
        ]
    )
    np.testing.assert_array_equal(got, expected)


@dataclasses.dataclass(frozen=True)
class Case:
    """One forward's attention inputs: random q/k/v and pool, a real layout (the planner's)."""

    q: np.ndarray  # [T, K, G, D]
    k: np.ndarray  # [T, K, D]
    v: np.ndarray
    pool_k: np.ndarray  # [K, P, D]
    pool_v: np.ndarray
    meta: BlockMeta
    block: int
    tile: int

    @property
    def arrays(self) -> tuple:
        return self.q, self.k, self.v, self.pool_k, self.pool_v, self.meta


def random_case(
    seed: int, block: int = 16, tile: int = 32, max_blocks: int = 12, g: int = 2, d: int = 32,
    pool: bool = True,
) -> Case:  # fmt: skip
    """A forward the planner lays out from random requests: items of a cached query (its keys
    in the pool, unless `pool` is False: packed mode, no pool), items of a query run in the
    stream, short items packed in blocks, long ones over several, item_first rows (causal
    runs), with the tokens' positions."""
    rng = np.random.default_rng(seed)
    tokens = lambda n: tuple(rng.integers(1, 1000, int(n)).tolist())  # noqa: E731
    lengths = (1, 2, 3, 5, 9, 13, 17, 23, 40)
    items = lambda n: tuple(tokens(x) for x in rng.choice(lengths, n))  # noqa: E731
    cached = tokens(rng.integers(5, 40))
    prefix_pool = PrefixPool(96, 16) if pool else None
    if prefix_pool is not None:
        prefix_pool.allocate(cached, set())
        prefix_pool.commit([cached])
    chunks = [
        Chunk(cached, items(3), (1,)),
        Chunk(tokens(rng.integers(3, 30)), items(4), (1,)),
        Chunk(tokens(7), items(2), (1,), item_first=True),
        Chunk(cached, items(3), (1,)),
    ]
    order = rng.permutation(len(chunks))
    mode = Mode.PREFIX if pool else Mode.PACKED
    f = plan(
        [chunks[i] for i in order],
        mode,
        block=block,
        tile=tile,
        max_blocks=max_blocks,
        max_labels=4,
        pool=prefix_pool,
    ).forwards[0]
    t, k = len(f.tokens), 2
    x = jax.random.split(jax.random.key(seed), 5)
    meta = BlockMeta(f.prefix, f.own, f.local_start, f.pos)
    return Case(
        np.asarray(jax.random.normal(x[0], (t, k, g, d))),
        np.asarray(jax.random.normal(x[1], (t, k, d))),
        np.asarray(jax.random.normal(x[2], (t, k, d))),
        np.asarray(jax.random.normal(x[3], (k, 96 + 64, d))),
        np.asarray(jax.random.normal(x[4], (k, 96 + 64, d))),
        meta,
        block,
        f.tile,
    )


def test_random_cases_cover_every_kind_of_block():
    """The generator has teeth: its forwards hold pool and stream prefixes, long items (own
    ranges with the prefix), causal runs (own ranges without), runs whose last block goes on
    with items, tiles with blocks of several prefixes."""
    cases = [random_case(seed) for seed in range(6)]
    prefix = np.concatenate([c.meta.prefix for c in cases])
    own = np.concatenate([c.meta.own for c in cases])
    assert {POOL, STREAM} <= {int(s) for s, _, n in prefix if n}
    assert ((own[:, 0] == TAKES_ALL) & (own[:, 2] > 0)).any()  # a long item's later block
    assert ((own[:, 0] == TAKES_NONE) & (own[:, 2] > 0)).any()  # a causal run's later block
    assert (own[:, 0] == TAKES_AFTER_RUN).any()
    mixed = [
        len({tuple(p) for p in c.meta.prefix[b : b + c.tile // c.block] if p[2]}) > 1
        for c in cases
        for b in range(0, len(c.meta.prefix), c.tile // c.block)
    ]
    assert any(mixed)
    # An own range ends where its block starts (the XLA walk reads a spanning sequence's keys
    # from its start to each row, through its own block): the planner's layout.
    for c in cases:
        blocks = np.arange(len(c.meta.own)) * c.block
        spanning = c.meta.own[:, 2] > 0
        np.testing.assert_array_equal(
            (c.meta.own[:, 1] + c.meta.own[:, 2])[spanning], blocks[spanning]
        )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("key_tiles", [(8, 8), (16, 8), (64, 16)])
def test_block_attention_matches_reference(seed, key_tiles, record):
    c = random_case(seed)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32
        want = block_attention_reference(*c.arrays, block=c.block)
        got = block_attention(*c.arrays, block=c.block, tile=c.tile, key_tiles=key_tiles)
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    record("block attention (XLA, tiled) vs reference", diff)
    assert diff <= 1e-5


def test_dense_baseline_matches_reference(record):
    c = random_case(7, pool=False)  # packed mode: every prefix in the stream, no pool
    with jax.default_matmul_precision("highest"):
        want = block_attention_reference(*c.arrays, block=c.block)
        got = dense_attention(c.q, c.k, c.v, c.meta, block=c.block)
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    record("dense baseline vs reference", diff)
    assert diff <= 1e-5


def test_keys_from_pool_or_stream_give_the_same_bits():
    """An item scores identically whether its query's keys are read from the pool (cached) or
    from a query run earlier in the stream, at any offset, whatever else is in its tile and
    the stream: its tile's other block holds a causal run, or items of another query (the tile
    then walks two prefixes, each for its own rows)."""
    rng = np.random.default_rng(3)
    block, tile, d, q_len = 16, 32, 32, 37
    query_k = rng.standard_normal((q_len, 2, d)).astype(np.float32)
    query_v = rng.standard_normal((q_len, 2, d)).astype(np.float32)
    item_q = rng.standard_normal((block, 2, 2, d)).astype(np.float32)
    item_k = rng.standard_normal((block, 2, d)).astype(np.float32)
    item_v = rng.standard_normal((block, 2, d)).astype(np.float32)
    local = np.array([0] * 5 + [5] * 11, np.int32)  # items of 5 and 11 tokens

    def run(pool_at: int | None, stream_at: int, other: np.ndarray, mixed=False) -> np.ndarray:
        nb = 8  # the items in block 6 (tile 3); the query run (3 blocks) at block stream_at
        t = nb * block
        q = rng.standard_normal((t, 2, 2, d)).astype(np.float32)
        k = rng.standard_normal((t, 2, d)).astype(np.float32)
        v = rng.standard_normal((t, 2, d)).astype(np.float32)
        pool_k = rng.standard_normal((2, 200, d)).astype(np.float32)
        pool_v = rng.standard_normal((2, 200, d)).astype(np.float32)
        prefix = [(POOL, 0, 0)] * nb
        own = [(0, 0, 0, 0)] * nb
        if pool_at is None:  # the query run sits in the stream at block `stream_at`
            k[stream_at * block : stream_at * block + q_len] = query_k
            v[stream_at * block : stream_at * block + q_len] = query_v
            prefix[6] = (STREAM, stream_at * block, q_len)
        else:
            pool_k[:, pool_at : pool_at + q_len] = query_k.swapaxes(0, 1)
            pool_v[:, pool_at : pool_at + q_len] = query_v.swapaxes(0, 1)
            prefix[6] = (POOL, pool_at, q_len)
        own[6] = (TAKES_ALL, 6 * block, 0, q_len)
        # The tile's other block: a causal run, or items of another query (a second prefix).
        own[7] = (TAKES_ALL, 7 * block, 0, 9) if mixed else (TAKES_NONE, 7 * block, 0, 0)
        if mixed:
            prefix[7] = (POOL, 100, 9)
        q[-2 * block : -block], k[-2 * block : -block], v[-2 * block : -block] = (
            item_q,
            item_k,
            item_v,
        )
        q[-block:] = other
        ls = np.zeros(t, np.int32)
        ls[-2 * block : -block] = local
        meta = BlockMeta(prefix_array(prefix), own_array(own), ls)
        out = block_attention(
            q, k, v, pool_k, pool_v, meta, block=block, tile=tile, key_tiles=(32, 8)
        )
        return np.asarray(out)[-2 * block : -block]

    base = run(None, 0, rng.standard_normal((block, 2, 2, d)).astype(np.float32))
    for pool_at in (0, 3, 150):
        other = rng.standard_normal((block, 2, 2, d)).astype(np.float32)
        np.testing.assert_array_equal(run(pool_at, 0, other), base)
        np.testing.assert_array_equal(run(pool_at, 0, other, mixed=True), base)
    np.testing.assert_array_equal(run(None, 1, np.zeros_like(base)), base)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_a_row_does_not_depend_on_who_else_takes_its_prefix(softcap):
    """Items whose tile's other blocks take the same prefix (the prefix's tiles then run without
    a mask) or another sequence's (a causal run: the tiles run masked) give the same bits,
    soft-capped or not (Gemma 2: XLA rounded tanh differently in the two steps)."""
    rng = np.random.default_rng(0)
    block, t = 16, 64
    fixed = [
        rng.standard_normal(s).astype(np.float32) * 3 for s in ((block, 2, 2, 32), (block, 2, 32))
    ]
    pool = rng.standard_normal((2, 300, 32)).astype(np.float32) * 3
    local = np.repeat([0, 3, 7, 12], [3, 4, 5, 4]).astype(np.int32)

    def run(others: int) -> np.ndarray:
        q, k = rng.standard_normal((t, 2, 2, 32)), rng.standard_normal((t, 2, 32))
        q, k = q.astype(np.float32), k.astype(np.float32)
        q[:block], k[:block] = fixed
        ls = np.zeros(t, np.int32)
        ls[:block] = local
        own = own_array([(TAKES_ALL, 0, 0, 171)] + [(others, 0, 0, 171)] * 3)
        meta = BlockMeta(prefix_array([(POOL, 5, 171)] * 4), own, ls)
        out = block_attention(
            q, k, k, pool, pool, meta, block=block, tile=t, key_tiles=(64, 16), softcap=softcap
        )
        return np.asarray(out)[:block]

    np.testing.assert_array_equal(run(TAKES_ALL), run(TAKES_NONE))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_a_sequence_across_blocks_does_not_depend_on_its_tiles(softcap):
    """A long item's later blocks read its earlier tokens as their own range, walked once per
    tile for all of the item's blocks there: the item's rows give the same bits whichever block
    of a tile it starts in, whatever runs before it (a causal run of another length) and after
    it (a short item of the same query in its last block), and match the reference."""
    rng = np.random.default_rng(5)
    block, tile, d, q_len = 16, 64, 32, 40
    n = 5 * block + 7  # the item: 6 blocks, the last one shared with a 9-token item
    fixed = [rng.standard_normal(s).astype(np.float32) for s in ((n, 2, 2, d), (n, 2, d))]
    pool_k = rng.standard_normal((2, 100, d)).astype(np.float32)
    pool_v = rng.standard_normal((2, 100, d)).astype(np.float32)

    def run(before: int) -> np.ndarray:
        nb = -(-(before + 6) * block // tile) * tile // block
        t = nb * block
        q = rng.standard_normal((t, 2, 2, d)).astype(np.float32)
        k, v = (rng.standard_normal((t, 2, d)).astype(np.float32) for _ in range(2))
        at = before * block
        q[at : at + n], k[at : at + n] = fixed
        v[at : at + n] = fixed[1] * 0.5
        prefix = [(POOL, 0, 0)] * nb
        own = [(TAKES_NONE, b * block, 0, 0) for b in range(nb)]
        for b in range(before):  # a causal run of `before` blocks
            own[b] = (TAKES_NONE, 0, b * block, 0)
        for m in range(6):  # the item, then the other item in its last block
            prefix[before + m] = (POOL, 5, q_len)
            own[before + m] = (TAKES_ALL, at, m * block, q_len)
        ls = np.zeros(t, np.int32)
        ls[at + n : at + 6 * block] = n - 5 * block
        meta = BlockMeta(prefix_array(prefix), own_array(own), ls)
        args = (q, k, v, pool_k, pool_v, meta)
        out = block_attention(*args, block=block, tile=tile, key_tiles=(32, 8), softcap=softcap)
        want = block_attention_reference(*args, block=block, softcap=softcap)
        got = np.asarray(out)
        np.testing.assert_allclose(got, np.asarray(want), atol=2e-6, rtol=1e-5)
        return got[at : at + n]

    base = run(0)
    for before in (1, 2, 3, 5):
        np.testing.assert_array_equal(run(before), base)
