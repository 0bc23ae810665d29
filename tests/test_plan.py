"""The planner (models/plan.py): the stream layout written out by hand, and its budget paths."""

from __future__ import annotations

import numpy as np

from mis_kernels.layout import TAKES_AFTER_RUN, TAKES_ALL, TAKES_NONE
from models.inputs import Chunk
from models.plan import ITEM, PAD, RUN, Mode, plan, stream_blocks, stream_ladder
from models.pool import PrefixPool

QUERY = (11, 12, 13, 14, 15)
# A (3 tokens), B (2), C (6: longer than a block of 4), D (1)
ITEMS = ((21, 22, 23), (31, 32), (41, 42, 43, 44, 45, 46), (51,))


def _chunk(labels=(7, 8)) -> Chunk:
    return Chunk(QUERY, ITEMS, labels)


def test_packed_layout_by_hand():
    (f,) = plan([_chunk()], Mode.PACKED, block=4, tile=8, max_blocks=8, max_labels=4).forwards
    # blocks 0-1: the query run, then item A in its last block; block 2: item B, then D (first
    # fit); blocks 3-4: item C over two blocks; 8 blocks (the ladder's next rung).
    np.testing.assert_array_equal(
        f.tokens,
        [11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 51, 0, 41, 42, 43, 44, 45, 46] + [0] * 14,
    )
    np.testing.assert_array_equal(
        f.pos, [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 5, 0, 5, 6, 7, 8, 9, 10] + [0] * 14
    )
    np.testing.assert_array_equal(f.local_start, [0] * 5 + [1] * 3 + [0, 0, 2] + [0] * 21)
    # Per block: its prefix (the query run [0, 5) of this stream), ...
    np.testing.assert_array_equal(f.prefix[:5], [[0, 0, 0]] + [[1, 0, 5]] * 4)
    # ... who takes it (none / all / after the run), its own range (start, len), first position.
    np.testing.assert_array_equal(
        f.own[:5],
        [
            [TAKES_NONE, 0, 0, 0],
            [TAKES_AFTER_RUN, 0, 4, 0],  # the run's q4 reads q0-q3; A reads the prefix
            [TAKES_ALL, 8, 0, 5],
            [TAKES_ALL, 12, 0, 5],
            [TAKES_ALL, 12, 4, 5],  # C's second block reads its first
        ],
    )
    assert (f.own[5:] == 0).all() and (f.prefix[5:] == 0).all()
    np.testing.assert_array_equal(f.score_idx, [7, 9, 17, 10])  # each item's last token
    assert f.dest == [(0, 0), (0, 1), (0, 2), (0, 3)]
    np.testing.assert_array_equal(f.kind[:12], [RUN] * 5 + [ITEM] * 6 + [PAD])
    np.testing.assert_array_equal(f.labels, [7, 8, 0, 0])
    assert f.label_cols == {0: [0, 1]} and f.real_tokens == 17 and f.tile == 8
    assert (f.write_idx == 0).all()  # packed mode keeps nothing (0 = the empty pool's end)


def test_prefix_mode_writes_the_query_then_reads_it_from_the_pool():
    pool = PrefixPool(tokens=256, align=128)
    (first,) = plan(
        [_chunk()], Mode.PREFIX, block=4, tile=8, max_blocks=8, max_labels=4, pool=pool
    ).forwards
    np.testing.assert_array_equal(first.write_idx[:5], [0, 1, 2, 3, 4])  # into the pool
    assert (first.write_idx[5:] == 256).all()  # items: dropped
    (second,) = plan(
        [_chunk()], Mode.PREFIX, block=4, tile=8, max_blocks=8, max_labels=4, pool=pool
    ).forwards
    # No query run: the items start at block 0 and read the query from pool range [0, 5).
    np.testing.assert_array_equal(
        second.tokens, [21, 22, 23, 51, 31, 32, 0, 0, 41, 42, 43, 44, 45, 46, 0, 0]
    )
    np.testing.assert_array_equal(second.prefix, [[0, 0, 5]] * 4)
    np.testing.assert_array_equal(second.own[2:], [[TAKES_ALL, 8, 0, 5], [TAKES_ALL, 8, 4, 5]])
    np.testing.assert_array_equal(second.local_start[:4], [0, 0, 0, 3])


def test_a_full_forward_continues_in_the_next():
    """Blocks of 4, two blocks per forward: packed mode runs the query again with the rest of
    the items; prefix mode reads it from the pool."""
    items = ((1, 2), (3, 4), (5, 6))
    c = Chunk((9, 9), items, (7,))
    packed = plan([c], Mode.PACKED, block=4, tile=4, max_blocks=1, max_labels=2).forwards
    assert [f.tokens.tolist() for f in packed] == [[9, 9, 1, 2], [9, 9, 3, 4], [9, 9, 5, 6]]
    pool = PrefixPool(tokens=128, align=128)
    prefix = plan([c], Mode.PREFIX, block=4, tile=4, max_blocks=1, max_labels=2, pool=pool)
    assert [f.tokens.tolist() for f in prefix.forwards] == [[9, 9, 1, 2], [3, 4, 5, 6]]
    np.testing.assert_array_equal(prefix.forwards[1].prefix, [[0, 0, 2]])
    assert [d for f in prefix.forwards for d in f.dest] == [(0, 0), (0, 1), (0, 2)]


def test_labels_of_a_forward_are_bounded():
    a = Chunk((1,), ((2,),), (10, 11))
    b = Chunk((3,), ((4,),), (12, 13))
    one = plan([a, b], Mode.PACKED, block=4, tile=4, max_blocks=4, max_labels=4).forwards
    two = plan([a, b], Mode.PACKED, block=4, tile=4, max_blocks=4, max_labels=3).forwards
    assert len(one) == 1 and one[0].label_cols == {0: [0, 1], 1: [2, 3]}
    assert len(two) == 2


def test_serial_runs_start_at_block_boundaries():
    chunk = Chunk((1, 2, 3), ((4,), (5, 6)), (7,))
    (f,) = plan([chunk], Mode.SERIAL, block=4, tile=4, max_blocks=4, max_labels=2).forwards
    np.testing.assert_array_equal(f.tokens, [1, 2, 3, 4, 1, 2, 3, 5, 6, 0, 0, 0, 0, 0, 0, 0])
    # Run 2's second block reads its first as its own range; no block takes a prefix.
    np.testing.assert_array_equal(f.own[:3], [[0, 0, 0, 0], [0, 4, 0, 0], [0, 4, 4, 0]])
    np.testing.assert_array_equal(f.score_idx, [3, 8])


def test_stream_lengths_form_a_short_ladder():
    assert stream_ladder(16, 4) == [1, 2, 4, 8, 16]
    assert stream_ladder(12) == [1, 2, 4, 8, 12]  # the top rung need not be a power of two
    assert [stream_blocks(n, 12) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    # Long forwards: eighths of the longest (whole tiles of 4 blocks) above the powers of two,
    # so a forward of 71 blocks is padded to 80, not 128.
    assert stream_ladder(128, 4) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert stream_blocks(71, 128, 4) == 80
