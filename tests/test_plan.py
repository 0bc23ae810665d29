"""The planner (models/plan.py): the stream layout written out by hand, and its budget paths."""

from __future__ import annotations

import numpy as np

from models.inputs import Chunk
from models.plan import Mode, plan, stream_blocks, stream_ladder
from models.pool import PrefixPool

QUERY = (11, 12, 13, 14, 15)
ITEMS = ((21, 22, 23), (31, 32), (41, 42, 43, 44))


def _chunk(labels=(7, 8)) -> Chunk:
    return Chunk(QUERY, ITEMS, labels)


def test_packed_layout_by_hand():
    (f,) = plan([_chunk()], Mode.PACKED, block=8, max_blocks=4, max_labels=4).forwards
    # block 0: the query run, then item A in the same block; block 1: items B and C.
    np.testing.assert_array_equal(
        f.tokens, [11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 41, 42, 43, 44, 0, 0]
    )
    np.testing.assert_array_equal(f.pos, [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 5, 6, 7, 8, 0, 0])
    np.testing.assert_array_equal(f.local_start, [0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(f.ranges, [[0, 0, 0, 5], [0, 0, 0, 5]])  # stream range: query
    np.testing.assert_array_equal(f.score_idx, [7, 9, 13])  # each item's last token
    assert f.dest == [(0, 0), (0, 1), (0, 2)]
    np.testing.assert_array_equal(f.labels, [7, 8, 0, 0])
    assert f.label_cols == {0: [0, 1]} and f.real_tokens == 14
    assert (f.write_idx == 0).all()  # packed mode keeps nothing (0 = the empty pool's end)


def test_prefix_mode_writes_the_query_then_reads_it_from_the_pool():
    pool = PrefixPool(tokens=256, align=128)
    (first,) = plan(
        [_chunk()], Mode.PREFIX, block=8, max_blocks=4, max_labels=4, pool=pool
    ).forwards
    np.testing.assert_array_equal(first.write_idx[:5], [0, 1, 2, 3, 4])  # into the pool
    assert (first.write_idx[5:] == 256).all()  # items: dropped
    (second,) = plan(
        [_chunk()], Mode.PREFIX, block=8, max_blocks=4, max_labels=4, pool=pool
    ).forwards
    # No query run: the items start at block 0 and read the query from pool range [0, 5);
    # item C does not fit the 3 tokens left in block 0 and opens block 1.
    np.testing.assert_array_equal(second.tokens[:12], [21, 22, 23, 31, 32, 0, 0, 0, 41, 42, 43, 44])
    np.testing.assert_array_equal(second.pos[:12], [5, 6, 7, 5, 6, 0, 0, 0, 5, 6, 7, 8])
    np.testing.assert_array_equal(second.ranges, [[0, 5, 0, 0], [0, 5, 0, 0]])
    np.testing.assert_array_equal(second.local_start[:12], [0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0])


def test_a_full_forward_continues_in_the_next():
    """Blocks of 4, one block per forward: packed mode runs the query again with the rest of
    the items; prefix mode reads it from the pool."""
    items = ((1, 2), (3, 4), (5, 6))
    c = Chunk((9, 9), items, (7,))
    packed = plan([c], Mode.PACKED, block=4, max_blocks=1, max_labels=2).forwards
    assert [f.tokens.tolist() for f in packed] == [[9, 9, 1, 2], [9, 9, 3, 4], [9, 9, 5, 6]]
    pool = PrefixPool(tokens=128, align=128)
    prefix = plan([c], Mode.PREFIX, block=4, max_blocks=1, max_labels=2, pool=pool).forwards
    assert [f.tokens.tolist() for f in prefix] == [[9, 9, 1, 2], [3, 4, 5, 6]]
    np.testing.assert_array_equal(prefix[1].ranges, [[0, 2, 0, 0]])
    assert [d for f in prefix for d in f.dest] == [(0, 0), (0, 1), (0, 2)]


def test_labels_of_a_forward_are_bounded():
    a = Chunk((1,), ((2,),), (10, 11))
    b = Chunk((3,), ((4,),), (12, 13))
    one = plan([a, b], Mode.PACKED, block=4, max_blocks=4, max_labels=4).forwards
    two = plan([a, b], Mode.PACKED, block=4, max_blocks=4, max_labels=3).forwards
    assert len(one) == 1 and one[0].label_cols == {0: [0, 1], 1: [2, 3]}
    assert len(two) == 2


def test_serial_runs_start_at_block_boundaries():
    (f,) = plan(
        [Chunk((1, 2, 3), ((4,), (5, 6)), (7,))], Mode.SERIAL, block=4, max_blocks=4, max_labels=2
    ).forwards
    np.testing.assert_array_equal(f.tokens, [1, 2, 3, 4, 1, 2, 3, 5, 6, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(f.ranges[:3], [[0, 0, 0, 4], [0, 0, 4, 5], [0, 0, 4, 5]])
    np.testing.assert_array_equal(f.score_idx, [3, 8])


def test_stream_lengths_form_a_short_ladder():
    assert stream_ladder(16) == [1, 2, 4, 8, 16]
    assert stream_ladder(12) == [1, 2, 4, 8, 12]  # the top rung need not be a power of two
    assert [stream_blocks(n, 12) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
