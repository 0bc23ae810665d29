"""The segment-mask kernel against the materialised-mask reference, plus a hand-written mask."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kernels.segment_attention import build_dense_mask, dense_mask_attention, segment_attention


def test_mask_by_hand():
    # query of 2 tokens padded to a head of 3; two slots of 2: item A = 2 tokens, item B = 1.
    pos = np.array([[0, 1, 2, 2, 3, 2, 2]])
    item_off = np.array([[-1, -1, -1, 0, 1, 0, -1]])
    mask = build_dense_mask(pos, item_off, np.array([2]), head_len=3, slot_len=2)
    expected = np.array(
        [
            # q0 q1 pad A0 A1 B0 pad
            [1, 0, 0, 0, 0, 0, 0],  # q0
            [1, 1, 0, 0, 0, 0, 0],  # q1
            [1, 1, 0, 0, 0, 0, 0],  # head padding: sees the query, never itself
            [1, 1, 0, 1, 0, 0, 0],  # A0
            [1, 1, 0, 1, 1, 0, 0],  # A1
            [1, 1, 0, 0, 0, 1, 0],  # B0: never item A
            [1, 1, 0, 0, 0, 0, 0],  # slot padding
        ],
        bool,
    )
    np.testing.assert_array_equal(mask[0], expected)


def _random_stream(rng, batch, head_len, q_len, slot_len, item_lens, kv_heads, group, dim):
    slots = len(item_lens[0])
    t = head_len + slots * slot_len
    pos = np.zeros((batch, t), np.int32)
    item_off = np.full((batch, t), -1, np.int32)
    for b in range(batch):
        pos[b, :head_len] = np.arange(head_len)
        pos[b, head_len:] = q_len
        for s, n in enumerate(item_lens[b]):
            base = head_len + s * slot_len
            pos[b, base : base + n] = q_len + np.arange(n)
            item_off[b, base : base + n] = np.arange(n)
    q = rng.standard_normal((batch, t, kv_heads, group, dim)).astype(np.float32)
    k = rng.standard_normal((batch, t, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, t, kv_heads, dim)).astype(np.float32)
    return q, k, v, pos, item_off


@pytest.mark.parametrize(
    ("batch", "head_len", "q_len", "slot_len", "slots", "kv_heads", "group"),
    [
        (1, 64, 37, 8, 8, 2, 2),  # query shorter than its head bucket
        (2, 96, 96, 24, 16, 1, 4),  # several rows, query filling its head, MQA
        (1, 64, 1, 16, 8, 4, 1),  # one-token query, no GQA grouping
        (1, 128, 100, 40, 3, 2, 3),  # odd slot count and group size
    ],
)
def test_segment_matches_dense(batch, head_len, q_len, slot_len, slots, kv_heads, group):
    rng = np.random.default_rng(head_len + slots)
    item_lens = rng.integers(1, slot_len + 1, (batch, slots))
    item_lens[:, -1] = 0  # an empty (padding) slot
    q, k, v, pos, item_off = _random_stream(
        rng, batch, head_len, q_len, slot_len, item_lens, kv_heads, group, 16
    )
    prefix_len = np.full((batch,), q_len, np.int32)
    seg = jax.jit(
        lambda *a: segment_attention(*a, head_len=head_len, num_slots=slots, slot_len=slot_len)
    )(q, k, v, k[:, :head_len], v[:, :head_len], pos, item_off, prefix_len)
    mask = build_dense_mask(pos, item_off, prefix_len, head_len=head_len, slot_len=slot_len)
    dense = jax.jit(dense_mask_attention)(q, k, v, mask)
    assert np.abs(np.asarray(seg) - np.asarray(dense)).max() <= 1e-5


def test_external_prefix_equals_head_prefix():
    """Prefix mode (cached query K/V, no head) gives the item tokens of packed mode."""
    rng = np.random.default_rng(7)
    head, q_len, w, s = 64, 50, 16, 8
    item_lens = rng.integers(1, w + 1, (1, s))
    q, k, v, pos, item_off = _random_stream(rng, 1, head, q_len, w, item_lens, 2, 2, 16)
    prefix_len = np.array([q_len], np.int32)
    packed = segment_attention(
        q,
        k,
        v,
        k[:, :head],
        v[:, :head],
        pos,
        item_off,
        prefix_len,
        head_len=head,
        num_slots=s,
        slot_len=w,
    )
    extend = segment_attention(
        q[:, head:],
        k[:, head:],
        v[:, head:],
        k[:, :head],
        v[:, :head],
        pos[:, head:],
        item_off[:, head:],
        prefix_len,
        head_len=0,
        num_slots=s,
        slot_len=w,
    )
    live = item_off[0, head:] >= 0
    diff = np.abs(np.asarray(packed)[0, head:][live] - np.asarray(extend)[0][live]).max()
    assert diff <= 1e-6
