"""From chunks of any number of requests to forwards over one flat stream of blocks (host side).

The stream is cut into blocks of `block` tokens (mis_kernels/block_attention.py: a block's
prefix, its own range, its tokens' local keys). Sequences:

- a causal run (a query prefilled: in prefix mode its K/V are also written to the pool for
  later forwards; a serial `query ++ item` row): from a block boundary over as many blocks as
  it needs, each block's own range the run before it;
- a query's items: their blocks take the query's keys as their prefix (in the pool, or its run
  earlier in this forward). An item goes where a block of its query has room left (packed back
  to back, first fit; the last block of the query's run too), or starts a new block and goes on
  over as many as it needs (its later blocks read its earlier part as their own range; items of
  its query may follow it in its last block). Items of any length.

A sequence that spans blocks starts at a block boundary, so what a token computes depends on
its own sequence only, never on where the sequence sits or what else shares the forward. A
forward holds at most `max_blocks` blocks and its chunks' labels together; what does not fit
goes to the next one (prefix mode: reading the query from the pool by then; packed mode:
running it again). A forward is padded to the next rung of a short ladder of stream lengths
(what warm-up compiles): powers of two, then steps of an eighth of the longest. Blocks are
grouped in tiles of `tile` tokens, whose rows of one query score against its keys together;
a stream's length is a whole number of tiles (or one, shorter).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable, Sequence

import numpy as np

from mis_kernels.layout import POOL, STREAM, TAKES_AFTER_RUN, TAKES_ALL, TAKES_NONE
from models.inputs import Chunk
from models.pool import PrefixPool


def stream_ladder(max_blocks: int, per_tile: int = 1) -> list[int]:
    """Every stream length (in blocks) a forward can have: what warm-up compiles. Powers of two,
    then, from an eighth of `max_blocks` (in whole tiles of `per_tile` blocks) on, steps of an
    eighth, and `max_blocks` itself: a long forward is padded by at most an eighth of the
    longest, not up to twice its length. A short `max_blocks` (an eighth under 4 blocks) keeps
    the powers of two alone."""
    step = max_blocks // 8 // per_tile * per_tile
    pow2 = {1 << i for i in range(max_blocks.bit_length()) if 1 << i < max_blocks}
    if step < max(4, per_tile):
        return sorted(pow2 | {max_blocks})
    return sorted({n for n in pow2 if n < step} | set(range(step, max_blocks, step)) | {max_blocks})


def stream_blocks(n: int, max_blocks: int, per_tile: int = 1) -> int:
    """Blocks of the compiled stream holding n blocks: the smallest rung >= n."""
    return next(r for r in stream_ladder(max_blocks, per_tile) if r >= n)


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
    prefix: np.ndarray  # [T / block, 3] per block: source (POOL | STREAM), start, len
    own: np.ndarray  # [T / block, 4] per block: who takes the prefix, own start, len, first pos
    write_idx: np.ndarray  # [T] pool slot for the token's K/V; >= pool size: not written
    block_slot: np.ndarray  # [T / block] the adapter slot each block's tokens use (0: base)
    score_idx: np.ndarray  # [S] stream index of each scored token
    labels: np.ndarray  # [U] label ids of all the forward's chunks (padded with 0)
    dest: list[tuple[int, int]]  # per score: (chunk, item)
    label_cols: dict[int, list[int]]  # per chunk: the column of each of its labels in `labels`
    real_tokens: int  # tokens that are not padding
    kind: np.ndarray  # [T] int8: PAD, RUN (a causal run: a query prefilled, a serial row), ITEM
    tile: int = 0  # tokens per tile of this stream (a stream shorter than a tile is one)
    fills: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # queries it writes
    # into the pool (prefix mode): cached once this forward has returned (PrefixPool.commit)


@dataclasses.dataclass
class Plan:
    forwards: list[Forward]
    prefix_hits: int = 0  # chunks whose query was found in the pool (or earlier in the forward)
    prefix_misses: int = 0  # chunks whose query ran


Prefix = tuple[int, int, int]  # source, start, len
PAD, RUN, ITEM = 0, 1, 2  # Forward.kind


class _Builder:
    """One forward being filled, block by block."""

    def __init__(self, block: int, tile: int, max_blocks: int, max_labels: int, drop: int):
        self.block, self.tile, self.max_blocks = block, tile, max_blocks
        self.max_labels, self.drop = max_labels, drop
        n = max_blocks * block
        self.tokens = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.local = np.zeros(n, np.int32)
        self.write = np.full(n, drop, np.int32)  # drop: past the pool's end
        self.kind = np.zeros(n, np.int8)
        self.own: list[list[int]] = []  # per block: takes, own start, len, pos
        self.slots: list[int] = []  # per block: its adapter slot
        self.prefix: list[Prefix] = []  # per block
        self.room: dict[Prefix, dict[int, int]] = {}  # blocks items of a query may join: used
        self.labels: list[int] = []
        self.label_cols: dict[int, list[int]] = {}
        self.scores: list[int] = []
        self.dest: list[tuple[int, int]] = []
        self.runs: dict[Hashable, tuple[int, int]] = {}  # query key -> its run (start, length)
        self.pinned: set[Hashable] = set()
        self.fills: list[Hashable] = []
        self.real = 0

    def empty(self) -> bool:
        return not self.own

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

    def _blocks(self, n: int) -> int:
        return -(-n // self.block)

    def _fit(self, prefix: Prefix, n: int) -> int | None:
        """A block of `prefix`'s items (or its run's last) with room for n more tokens (first
        fit), or None."""
        used = self.room.get(prefix, {})
        return next((b for b, n_used in used.items() if n_used + n <= self.block), None)

    def run_fits(self, n: int, then: int = 0) -> bool:
        """A run of n tokens from the next block, then (`then` > 0) a first item of its query
        of `then` tokens reading it from the stream (in the run's last block if it fits)."""
        blocks = self._blocks(n)
        tail = n - (blocks - 1) * self.block
        if then and not (then <= self.block and tail + then <= self.block):
            blocks += self._blocks(then)
        return len(self.own) + blocks <= self.max_blocks

    def item_fits(self, n: int, prefix: Prefix) -> bool:
        if n <= self.block and self._fit(prefix, n) is not None:
            return True
        return len(self.own) + self._blocks(n) <= self.max_blocks

    def _open(self, takes: int, own: tuple[int, int, int], prefix: Prefix, slot: int) -> None:
        self.own.append([takes, *own])
        self.prefix.append(prefix)
        self.slots.append(slot)

    def add_run(self, tokens: Sequence[int], write: np.ndarray | None, slot: int) -> int:
        """A causal run from the next block boundary, each block's own range the run before
        it. Returns the stream index of its first token."""
        n, start = len(tokens), len(self.own) * self.block
        for i in range(self._blocks(n)):
            self._open(TAKES_NONE, (start, i * self.block, 0), (POOL, 0, 0), slot)
        self.tokens[start : start + n] = tokens
        self.pos[start : start + n] = np.arange(n)
        self.kind[start : start + n] = RUN
        if write is not None:
            self.write[start : start + n] = write
        self.real += n
        return start

    def query_run(self, tokens: Sequence[int], write: np.ndarray | None, slot: int) -> Prefix:
        """A query's run, which its items read as their prefix: the first of them may follow it
        in its last block."""
        start = self.add_run(tokens, write, slot)
        prefix = (STREAM, start, len(tokens))
        last = len(self.own) - 1
        self.own[last][0] = TAKES_AFTER_RUN
        self.prefix[last] = prefix
        self.room.setdefault(prefix, {})[last] = (len(tokens) - 1) % self.block + 1
        return prefix

    def add_item(
        self, item: Sequence[int], prefix: Prefix, dest: tuple[int, int], slot: int
    ) -> None:
        """An item of the query `prefix` reads (its keys: source, start, length), scored at
        its last token. A prefix is one query under one adapter, so the blocks it shares hold
        one adapter's tokens."""
        n, query_len = len(item), prefix[2]
        room = self.room.setdefault(prefix, {})
        if n <= self.block and (b := self._fit(prefix, n)) is not None:
            start = b * self.block + room[b]  # after what block b already holds
            self.local[start : start + n] = room[b]
            room[b] += n
        else:
            start = len(self.own) * self.block
            for i in range(self._blocks(n)):
                self._open(TAKES_ALL, (start, i * self.block, query_len), prefix, slot)
            self.local[start : start + n] = 0
            room[len(self.own) - 1] = (n - 1) % self.block + 1
        self.tokens[start : start + n] = item
        self.pos[start : start + n] = query_len + np.arange(n)
        self.kind[start : start + n] = ITEM
        self.real += n
        self.score(start + n - 1, dest)

    def score(self, index: int, dest: tuple[int, int]) -> None:
        self.scores.append(index)
        self.dest.append(dest)

    def finish(self, max_labels: int) -> Forward:
        blocks = stream_blocks(len(self.own), self.max_blocks, self.tile // self.block)
        t = blocks * self.block
        own = np.zeros((blocks, 4), np.int32)
        own[: len(self.own)] = self.own
        prefix = np.zeros((blocks, 3), np.int32)  # len 0: no prefix
        prefix[: len(self.prefix)] = self.prefix
        block_slot = np.zeros(blocks, np.int32)
        block_slot[: len(self.slots)] = self.slots
        labels = np.zeros(max_labels, np.int32)
        labels[: len(self.labels)] = self.labels
        return Forward(
            tokens=self.tokens[:t].copy(),
            pos=self.pos[:t].copy(),
            local_start=self.local[:t].copy(),
            prefix=prefix,
            own=own,
            write_idx=self.write[:t].copy(),
            block_slot=block_slot,
            score_idx=np.asarray(self.scores, np.int32),
            labels=labels,
            dest=self.dest,
            label_cols=self.label_cols,
            real_tokens=self.real,
            kind=self.kind[:t].copy(),
            tile=min(self.tile, t),
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
    tile: int,
    max_blocks: int,
    max_labels: int,
    pool: PrefixPool | None = None,
    pad_id: int | None = None,
    adapters: Sequence[tuple[int, int]] | None = None,
) -> Plan:
    """Forwards scoring every item of every chunk (None: a chunk to skip), in order. In prefix
    mode it allocates pool ranges for the queries it prefills; the caller commits each
    forward's (`Forward.fills`) once that forward has run, or rolls them back (PrefixPool).
    `pad_id`: a classification head's pad token: each sequence of a chunk without label ids
    (one a classification head scores) is scored where transformers pools it (`pooled`), and
    an item of pad tokens only is pooled inside its query, so it runs as a causal run of the
    query's pooled part. `adapters`: per chunk (device slot, key), the
    LoRA adapter its tokens run with (default: the base, (0, 0)); a query is cached and shared
    per (adapter key, query), so K/V computed under one adapter never serve another."""
    if tile % block:
        raise ValueError(f"{tile=} must be a multiple of {block=}")
    drop = pool.tokens if pool is not None else 0
    out = Plan([])
    b = _Builder(block, tile, max_blocks, max_labels, drop)

    def flush() -> _Builder:
        if not b.empty():
            out.forwards.append(b.finish(max_labels))
        return _Builder(block, tile, max_blocks, max_labels, drop)

    def add_run(ci: int, ii: int, run: Sequence[int], labels: Sequence[int]) -> None:
        nonlocal b
        if not (b.run_fits(len(run)) and b.take_labels(ci, labels)):
            b = flush()
            b.take_labels(ci, labels)
            if not b.run_fits(len(run)):
                raise ValueError(f"a run of {len(run)} tokens does not fit a forward")
        b.score(b.add_run(run, None, slot) + len(run) - 1, (ci, ii))

    for ci, c in enumerate(chunks):
        if c is None or not c.items:
            continue
        slot, adapter = adapters[ci] if adapters is not None else (0, 0)
        pad = None if c.label_ids else pad_id  # an LM head scores the last token, pad or not
        query = list(c.query)
        if c.item_first or mode is Mode.SERIAL:
            for ii, item in enumerate(c.items):
                run = list(item) + query if c.item_first else query + list(item)
                add_run(ci, ii, pooled(run, pad), c.label_ids)
            continue
        items = {ii: pooled(it, pad) for ii, it in enumerate(c.items)}
        if pad is not None:
            for ii, item in enumerate(c.items):
                if all(t == pad for t in item):  # pooled inside the query: a run of its own
                    del items[ii]
                    add_run(ci, ii, pooled(query, pad), c.label_ids)
        todo = list(items)
        while todo:
            first = len(items[todo[0]])
            if not b.take_labels(ci, c.label_ids):
                b = flush()
                continue
            # The base's key is the query's tokens (the pool's default), an adapter's the pair.
            key = (adapter, tuple(query)) if adapter else tuple(query)
            prefix: Prefix
            if key in b.runs:  # this forward already runs the query
                prefix = (STREAM, *b.runs[key])
                out.prefix_hits += 1
            elif mode is Mode.PREFIX and (at := pool.find(query, key)) is not None:
                b.pinned.add(key)
                prefix = (POOL, at, len(query))
                out.prefix_hits += 1
            else:
                if not b.run_fits(len(query), then=first):
                    if b.empty():
                        raise ValueError(
                            f"a query of {len(query)} tokens and an item of {first} do not fit "
                            f"a forward of {max_blocks * block} tokens"
                        )
                    b = flush()
                    continue
                write = None
                if mode is Mode.PREFIX and (at := pool.allocate(query, b.pinned, key)) is not None:
                    b.pinned.add(key)
                    b.fills.append(key)
                    write = at + np.arange(len(query), dtype=np.int32)
                prefix = b.query_run(query, write, slot)
                b.runs[key] = prefix[1:]
                out.prefix_misses += 1
            while todo and b.item_fits(len(items[todo[0]]), prefix):
                ii = todo.pop(0)
                b.add_item(items[ii], prefix, (ci, ii), slot)
            if todo:
                if b.empty():
                    raise ValueError(f"an item of {first} tokens does not fit a forward")
                b = flush()
    flush()
    return out
