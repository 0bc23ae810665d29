"""Block attention (mis_kernels/block_attention.py): the mask by hand, the tiled XLA implementation
and the dense baseline against the plain reference, and the exactness the engine relies on."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mis_kernels.block_attention import (
    BlockMeta,
    block_attention,
    block_attention_reference,
    dense_attention,
    ranges_array,
    visible,
)


def test_mask_by_hand():
    # Pool of 3 keys (a cached query c0..c2). Blocks of 4 tokens:
    #   block 0: a query run q0 q1 q2, then item A (1 token) in the same block
    #   block 1: item B (2 tokens) of the same query, then padding
    #   block 2: item C (2 tokens) of the cached query, then padding
    # A sequence's blocks share its ranges: the query run as the stream range, or the pool.
    meta = BlockMeta(
        ranges_array([(0, 0, 0, 3), (0, 0, 0, 3), (0, 3, 0, 0)]),
        np.array([0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0], np.int32),
    )
    got = np.asarray(visible(meta, block=4, pool_size=3)).astype(int)
    expected = np.array(
        [
            # c0 c1 c2 | q0 q1 q2 A0 B0 B1 __ __ C0 C1 __ __
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q0: causal over the run
            [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q1
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # q2
            [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # A0: the query, itself
            [0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # B0: the query, never item A
            [0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0],  # B1
            [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # padding: its output is never
            [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0],  # read, and no token sees it
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # C0: the cached query, itself
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # C1
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0],  # padding
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],  # padding
        ]
    )
    np.testing.assert_array_equal(got, expected)


def random_case(seed: int, block: int = 16, pool: int = 80, nb: int = 8, k=2, g=2, d=32):
    """A stream of `nb` blocks of random layouts: a causal run spanning blocks, a query run
    whose last block goes on with items, items of a query earlier in the stream, items of a
    cached query in the pool; items back to back inside blocks."""
    rng = np.random.default_rng(seed)
    t = nb * block
    ranges, local = [], np.zeros(t, np.int32)

    def items_from(b: int, pos: int) -> None:
        while pos < block:
            n = int(rng.integers(1, 7))
            local[b * block + pos : b * block + min(pos + n, block)] = pos
            pos += n

    for b in range(nb):
        kind = b % 4
        if kind == 0:  # a causal run from block 0 up to here (e.g. a serial row)
            ranges.append((0, 0, 0, (b + 1) * block))
        elif kind == 1:  # a query run's tail (from the previous block), then items
            tail = int(rng.integers(1, block - 1))
            ranges.append((0, 0, (b - 1) * block + 3, block - 3 + tail))
            items_from(b, tail)
        elif kind == 2:  # items of a query run earlier in the stream
            ranges.append((0, 0, int(rng.integers(0, block)), int(rng.integers(1, b * block // 2))))
            items_from(b, 0)
        else:  # items of a cached query
            p_len = int(rng.integers(1, pool - 20))
            ranges.append((int(rng.integers(0, pool - p_len)), p_len, 0, 0))
            items_from(b, 0)
    key = jax.random.key(seed)
    kq, kk, kv, kpk, kpv = jax.random.split(key, 5)
    q = jax.random.normal(kq, (t, k, g, d))
    kk_ = jax.random.normal(kk, (t, k, d))
    vv = jax.random.normal(kv, (t, k, d))
    pool_k = jax.random.normal(kpk, (k, pool + 64, d))
    pool_v = jax.random.normal(kpv, (k, pool + 64, d))
    return q, kk_, vv, pool_k, pool_v, BlockMeta(ranges_array(ranges), local)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("key_tiles", [(8, 8), (16, 8), (64, 16)])
def test_block_attention_matches_reference(seed, key_tiles, record):
    q, k, v, pk, pv, meta = random_case(seed)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32
        want = block_attention_reference(q, k, v, pk, pv, meta, block=16)
        got = block_attention(q, k, v, pk, pv, meta, block=16, key_tiles=key_tiles)
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    record("block attention (XLA, tiled) vs reference", diff)
    assert diff <= 1e-5


def test_dense_baseline_matches_reference(record):
    q, k, v, pk, pv, meta = random_case(7)
    no_pool = BlockMeta(meta.ranges.copy(), meta.local_start)
    no_pool.ranges[:, 1] = 0  # the dense baseline has no pool (packed mode)
    with jax.default_matmul_precision("highest"):
        want = block_attention_reference(q, k, v, pk, pv, no_pool, block=16)
        got = dense_attention(q, k, v, no_pool, block=16)
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    record("dense baseline vs reference", diff)
    assert diff <= 1e-5


def test_keys_from_pool_or_stream_give_the_same_bits():
    """An item scores identically whether its query's keys are read from the pool (cached) or
    from a query run earlier in the stream, at any offset, whatever else is in the stream."""
    rng = np.random.default_rng(3)
    block, d, q_len = 16, 32, 37
    query_k = rng.standard_normal((q_len, 2, d)).astype(np.float32)
    query_v = rng.standard_normal((q_len, 2, d)).astype(np.float32)
    item_q = rng.standard_normal((block, 2, 2, d)).astype(np.float32)
    item_k = rng.standard_normal((block, 2, d)).astype(np.float32)
    item_v = rng.standard_normal((block, 2, d)).astype(np.float32)
    local = np.array([0] * 5 + [5] * 11, np.int32)  # items of 5 and 11 tokens

    def run(pool_at: int | None, stream_at: int, other: np.ndarray) -> np.ndarray:
        nb = 6  # the items in the last block; the query run (3 blocks) at block stream_at
        t = nb * block
        q = rng.standard_normal((t, 2, 2, d)).astype(np.float32)
        k = rng.standard_normal((t, 2, d)).astype(np.float32)
        v = rng.standard_normal((t, 2, d)).astype(np.float32)
        pool_k = rng.standard_normal((2, 200, d)).astype(np.float32)
        pool_v = rng.standard_normal((2, 200, d)).astype(np.float32)
        ranges = [(0, 0, 0, 0)] * nb
        if pool_at is None:  # the query run sits in the stream at block `stream_at`
            k[stream_at * block : stream_at * block + q_len] = query_k
            v[stream_at * block : stream_at * block + q_len] = query_v
            ranges[-1] = (0, 0, stream_at * block, q_len)
        else:
            pool_k[:, pool_at : pool_at + q_len] = query_k.swapaxes(0, 1)
            pool_v[:, pool_at : pool_at + q_len] = query_v.swapaxes(0, 1)
            ranges[-1] = (pool_at, q_len, 0, 0)
        q[-block:], k[-block:], v[-block:] = item_q, item_k, item_v
        q[(nb - 2) * block : (nb - 1) * block] = other  # another sequence's block
        ls = np.zeros(t, np.int32)
        ls[-block:] = local
        meta = BlockMeta(ranges_array(ranges), ls)
        out = block_attention(q, k, v, pool_k, pool_v, meta, block=block, key_tiles=(32, 8))
        return np.asarray(out)[-block:]

    base = run(None, 0, rng.standard_normal((block, 2, 2, d)).astype(np.float32))
    for pool_at in (0, 3, 150):
        other = rng.standard_normal((block, 2, 2, d)).astype(np.float32)
        np.testing.assert_array_equal(run(pool_at, 0, other), base)
    np.testing.assert_array_equal(run(None, 1, np.zeros_like(base)), base)
