"""From chunks of any number of requests to forwards over one flat stream of blocks (host side).

Every block of the stream belongs to one *sequence*, and a sequence's blocks share its key
ranges (mis_kernels/block_attention.py):

- a query and some of its items: the query's keys come from the pool (cached) or from a run of
  the query's own tokens placed first in the sequence (prefilled here; in prefix mode they are
  also written to the pool for later forwards), then the items back to back, an item never
  crossing a block boundary;
- one causal run: serial `query ++ item` (or `item ++ query`), scored at its last token.

Sequences start at block boundaries, so what a token computes depends on its own sequence only,
never on where the sequence sits or what else shares the forward. A forward holds at most
`max_blocks` blocks and its chunks' labels together; what does not fit goes to the next one
(prefix mode: reading the query from the pool by then; packed mode: running it again).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np

from models.buckets import pow2_bucket, pow2_upto
from models.inputs import Chunk
from models.pool import PrefixPool


def stream_blocks(n: int, max_blocks: int) -> int:
    """Blocks of the compiled stream holding n blocks: the next power of two, at most
    `max_blocks` (itself the top rung when it is not a power of two)."""
    return min(pow2_bucket(n), max_blocks)


def stream_ladder(max_blocks: int) -> list[int]:
    """Every stream length (in blocks) a forward can have: what warm-up compiles."""
    return sorted({min(n, max_blocks) for n in pow2_upto(max_blocks)})


class Mode(enum.Enum):
    SERIAL = "serial"  # one causal run per `query ++ item`: the baseline
    PACKED = "packed"  # the query runs with its items in every forward, never cached
    PREFIX = "prefix"  # the query runs once; its K/V are kept in the pool for later forwards


@dataclasses.dataclass
class Forward:
    """Host int32 inputs of one forward, and where each score goes."""

    tokens: np.ndarray  # [T]
    pos: np.ndarray  # [T] RoPE positions
    local_start: np.ndarray  # [T] index inside its block where a token's own keys start
    ranges: np.ndarray  # [T / block, 4]
    write_idx: np.ndarray  # [T] pool slot for the token's K/V; >= pool size: not written
    score_idx: np.ndarray  # [S] stream index of each scored token
    labels: np.ndarray  # [U] label ids of all the forward's chunks (padded with 0)
    dest: list[tuple[int, int]]  # per score: (chunk, item)
    label_cols: dict[int, list[int]]  # per chunk: the column of each of its labels in `labels`
    real_tokens: int  # tokens that are not padding
    fills: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # queries it writes
    # into the pool (prefix mode): cached once this forward has returned (PrefixPool.commit)


@dataclasses.dataclass
class Plan:
    forwards: list[Forward]
    prefix_hits: int = 0  # chunks whose query was found in the pool (or earlier in the forward)
    prefix_misses: int = 0  # chunks whose query ran


class _Builder:
    """One forward being filled, block by block."""

    def __init__(self, block: int, max_blocks: int, max_labels: int, drop: int):
        self.block, self.max_blocks, self.max_labels, self.drop = (
            block,
            max_blocks,
            max_labels,
            drop,
        )
        n = max_blocks * block
        self.tokens = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.local = np.zeros(n, np.int32)
        self.write = np.full(n, drop, np.int32)  # drop: past the pool's end
        self.ranges: list[tuple[int, int, int, int]] = []
        self.fill = block  # tokens used in the last block (full: the next item opens a block)
        self.seq = (0, 0, 0, 0)  # ranges of the sequence being placed
        self.labels: list[int] = []
        self.label_cols: dict[int, list[int]] = {}
        self.scores: list[int] = []
        self.dest: list[tuple[int, int]] = []
        self.runs: dict[tuple[int, ...], tuple[int, int]] = {}  # query run -> (start, length)
        self.pinned: set[tuple[int, ...]] = set()
        self.fills: list[tuple[int, ...]] = []
        self.real = 0

    @property
    def free_blocks(self) -> int:
        return self.max_blocks - len(self.ranges)

    def empty(self) -> bool:
        return not self.ranges

    def take_labels(self, chunk: int, labels: Sequence[int]) -> bool:
        """Give the chunk its label columns; False when the union would be too wide."""
        if chunk in self.label_cols:
            return True
        new = [x for x in dict.fromkeys(labels) if x not in self.labels]
        if len(self.labels) + len(new) > self.max_labels:
            return False
        self.labels += new
        self.label_cols[chunk] = [self.labels.index(x) for x in labels]
        return True

    def start_sequence(self, ranges: tuple[int, int, int, int]) -> None:
        self.seq = ranges
        self.fill = self.block

    def _open_block(self) -> int:
        self.ranges.append(self.seq)
        self.fill = 0
        return (len(self.ranges) - 1) * self.block

    def run_fits(self, n: int, then: int = 0) -> bool:
        """A run of n tokens (at a block boundary), then an item of `then` tokens."""
        blocks = -(-n // self.block)
        tail = n - (blocks - 1) * self.block
        extra = 1 if then and tail + then > self.block else 0
        return blocks + extra <= self.free_blocks

    def add_run(self, tokens: Sequence[int], write: np.ndarray | None) -> int:
        """A causal run from a block boundary; the sequence's stream range becomes the run.
        Returns the stream index of its last token."""
        n = len(tokens)
        start = len(self.ranges) * self.block
        self.seq = (self.seq[0], self.seq[1], start, n)
        for i in range(0, n, self.block):
            self._open_block()
            self.fill = min(self.block, n - i)
        self.tokens[start : start + n] = tokens
        self.pos[start : start + n] = np.arange(n)
        if write is not None:
            self.write[start : start + n] = write
        self.real += n
        return start + n - 1

    def item_fits(self, n: int) -> bool:
        return self.fill + n <= self.block or self.free_blocks > 0

    def add_item(self, item: Sequence[int], query_len: int, dest: tuple[int, int]) -> None:
        n = len(item)
        if self.fill + n > self.block:
            self._open_block()
        start = (len(self.ranges) - 1) * self.block + self.fill
        self.tokens[start : start + n] = item
        self.pos[start : start + n] = query_len + np.arange(n)
        self.local[start : start + n] = self.fill
        self.fill += n
        self.real += n
        self.score(start + n - 1, dest)

    def score(self, index: int, dest: tuple[int, int]) -> None:
        self.scores.append(index)
        self.dest.append(dest)

    def finish(self, max_labels: int) -> Forward:
        blocks = stream_blocks(len(self.ranges), self.max_blocks)
        t = blocks * self.block
        ranges = np.zeros((blocks, 4), np.int32)
        ranges[: len(self.ranges)] = self.ranges
        labels = np.zeros(max_labels, np.int32)
        labels[: len(self.labels)] = self.labels
        return Forward(
            tokens=self.tokens[:t].copy(),
            pos=self.pos[:t].copy(),
            local_start=self.local[:t].copy(),
            ranges=ranges,
            write_idx=self.write[:t].copy(),
            score_idx=np.asarray(self.scores, np.int32),
            labels=labels,
            dest=self.dest,
            label_cols=self.label_cols,
            real_tokens=self.real,
            fills=self.fills,
        )


def pooled(tokens: Sequence[int], pad_id: int | None) -> Sequence[int]:
    """What a sequence-classification head reads of a sequence: transformers' pooling takes the
    hidden state at the last token that is not `pad_id` (the first token when every one is,
    the last when the model has no pad id), and a causal model's hidden state there depends
    only on the tokens up to it. So: the sequence cut after that token."""
    if pad_id is None:
        return tokens
    last = next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i] != pad_id), 0)
    return tokens[: last + 1]


def plan(
    chunks: Sequence[Chunk | None],
    mode: Mode,
    *,
    block: int,
    max_blocks: int,
    max_labels: int,
    pool: PrefixPool | None = None,
    pad_id: int | None = None,
) -> Plan:
    """Forwards scoring every item of every chunk (None: a chunk to skip), in order. In prefix
    mode it allocates pool ranges for the queries it prefills; the caller commits each
    forward's (`Forward.fills`) once that forward has run, or rolls them back (PrefixPool).
    `pad_id`: a classification head's pad token: each sequence is scored where transformers
    pools it (`pooled`), and an item of pad tokens only is pooled inside its query, so it runs
    as a causal run of the query's pooled part."""
    drop = pool.tokens if pool is not None else 0
    out = Plan([])
    b = _Builder(block, max_blocks, max_labels, drop)

    def flush() -> _Builder:
        if not b.empty():
            out.forwards.append(b.finish(max_labels))
        return _Builder(block, max_blocks, max_labels, drop)

    def add_run(ci: int, ii: int, run: Sequence[int], labels: Sequence[int]) -> None:
        nonlocal b
        if not (b.run_fits(len(run)) and b.take_labels(ci, labels)):
            b = flush()
            b.take_labels(ci, labels)
        b.start_sequence((0, 0, 0, 0))
        b.score(b.add_run(run, None), (ci, ii))

    for ci, c in enumerate(chunks):
        if c is None or not c.items:
            continue
        query = list(c.query)
        if c.item_first or mode is Mode.SERIAL:
            for ii, item in enumerate(c.items):
                run = list(item) + query if c.item_first else query + list(item)
                add_run(ci, ii, pooled(run, pad_id), c.label_ids)
            continue
        items = {ii: pooled(it, pad_id) for ii, it in enumerate(c.items)}
        if pad_id is not None:
            for ii, item in enumerate(c.items):
                if all(t == pad_id for t in item):  # pooled inside the query: a run of its own
                    del items[ii]
                    add_run(ci, ii, pooled(query, pad_id), c.label_ids)
        todo = list(items)
        while todo:
            first = len(items[todo[0]])
            if not b.take_labels(ci, c.label_ids):
                b = flush()
                continue
            key = tuple(query)
            if key in b.runs:  # this forward already runs the query
                start, n = b.runs[key]
                b.start_sequence((0, 0, start, n))
                out.prefix_hits += 1
            elif mode is Mode.PREFIX and (at := pool.find(query)) is not None:
                b.pinned.add(key)
                b.start_sequence((at, len(query), 0, 0))
                out.prefix_hits += 1
            else:
                if not b.run_fits(len(query), then=first):
                    if b.empty():
                        raise ValueError(f"a query of {len(query)} tokens and an item do not fit")
                    b = flush()
                    continue
                write = None
                if mode is Mode.PREFIX and (at := pool.allocate(query, b.pinned)) is not None:
                    b.pinned.add(key)
                    b.fills.append(key)
                    write = at + np.arange(len(query), dtype=np.int32)
                b.start_sequence((0, 0, 0, 0))
                last = b.add_run(query, write)
                b.runs[key] = (last + 1 - len(query), len(query))
                out.prefix_misses += 1
            while todo and b.item_fits(len(items[todo[0]])):
                ii = todo.pop(0)
                b.add_item(items[ii], len(query), (ci, ii))
            if todo:
                b = flush()
    flush()
    return out
