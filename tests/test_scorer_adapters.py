"""A scorer replica's run-time adapters (serve_app/scorer.py `_RuntimeAdapters`), the
bookkeeping below Serve: a read that fails is answered as such for a while and then tried
again; one that succeeds is served under its engine name; one no longer listed leaves the
engine; an exception in that bookkeeping fails the replica, its queued chunks answered."""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest

from models.adapters import adapter_digest, write_random_adapter
from models.checkpoint import read_hf_config
from models.config import from_hf_config
from models.inputs import Chunk
from serve_app.chunk_call import AdapterLoading, ChunkFailure, EngineFailure
from serve_app.scorer import Scorer, _Pending, _RuntimeAdapters
from tests.conftest import LABELS


def test_a_failed_read_is_answered_for_a_while_then_tried_again(
    engine, ckpts, tmp_path, monkeypatch
):
    eng = engine("qwen3", "prefix", max_adapters=1)
    cfg = from_hf_config(read_hf_config(ckpts["qwen3"]))
    path = write_random_adapter(cfg, tmp_path / "x", rank=4, seed=1)
    digest = adapter_digest(path)  # what the ingress checked
    write_random_adapter(cfg, path, rank=4, seed=2)  # then the files changed
    table = (("x", str(path), digest),)
    chunk = Chunk((5, 6, 7), ((8, 9), (10,)), tuple(LABELS), adapter="x")
    runtime = _RuntimeAdapters()

    async def read(woke: asyncio.Event) -> None:
        """A chunk for "x" starts its read (AdapterLoading), then the read is taken in."""
        woke.clear()
        with pytest.raises(AdapterLoading, match="adapter 'x' is being loaded"):
            runtime.admit(chunk, table, eng, woke.set)
        await asyncio.wait_for(woke.wait(), 120)
        runtime.apply(eng, [])

    async def main() -> str:
        woke = asyncio.Event()
        await read(woke)
        # The failed read is the answer for FAILED_READ_S, not read again on every chunk.
        with pytest.raises(ChunkFailure, match="changed since the ingress checked"):
            runtime.admit(chunk, table, eng, woke.set)
        # Then it is tried again: the files are those checked now, so it is served.
        write_random_adapter(cfg, path, rank=4, seed=1)
        monkeypatch.setattr(_RuntimeAdapters, "FAILED_READ_S", 0.0)
        await read(woke)
        admitted = runtime.admit(chunk, table, eng, woke.set)
        name = _RuntimeAdapters.engine_name("x", str(path), digest)
        assert admitted.adapter == name and name in eng.adapters()
        (scores,) = eng.score([admitted])
        (base,) = eng.score([Chunk(chunk.query, chunk.items, chunk.label_ids)])
        assert scores.shape == base.shape and not np.array_equal(scores, base)
        # No longer listed (a later call's table) and named by no queued chunk: removed.
        runtime.admit(Chunk(chunk.query, chunk.items, chunk.label_ids), (), eng, woke.set)
        runtime.apply(eng, [admitted])  # still queued: kept
        assert name in eng.adapters()
        runtime.apply(eng, [])
        return name

    name = asyncio.run(main())
    assert name not in eng.adapters()


def test_a_failure_in_the_adapter_bookkeeping_fails_the_replica(
    engine, ckpts, tmp_path, monkeypatch
):
    """The engine's adapter state is unknown after such a failure: the batcher answers every
    queued chunk with EngineFailure (the ingress retries them elsewhere) and the replica asks
    to be replaced, rather than the batcher dying and its callers waiting forever."""
    eng = engine("qwen3", "prefix", max_adapters=1)
    cfg = from_hf_config(read_hf_config(ckpts["qwen3"]))
    path = write_random_adapter(cfg, tmp_path / "x", rank=4, seed=1)
    table = (("x", str(path), adapter_digest(path)),)

    def broken(name, adapter):
        raise RuntimeError("bookkeeping broke")

    monkeypatch.setattr(eng, "register_adapter", broken)
    cls = Scorer.func_or_class  # the replica's class, without Serve around it
    scorer = cls.__new__(cls)
    scorer.engine, scorer.replica, scorer._failure = eng, "r1", None
    scorer._queue, scorer._runtime = collections.deque(), _RuntimeAdapters()
    exits: list[bool] = []
    scorer._exit = lambda: exits.append(True)

    async def main() -> _Pending:
        scorer._wake = asyncio.Event()
        chunk = Chunk((5, 6, 7), ((8, 9),), tuple(LABELS), adapter="x")
        with pytest.raises(AdapterLoading):  # its read starts, and wakes the batcher when done
            scorer._runtime.admit(chunk, table, eng, scorer._wake.set)
        queued = _Pending(Chunk((5, 6), ((8,),), tuple(LABELS)), asyncio.Future(), 0.0)
        scorer._queue.append(queued)
        await asyncio.wait_for(scorer._run_batches(), 120)  # returns: the replica failed
        await asyncio.sleep(0)  # the replica's exit is scheduled on the loop
        return queued

    queued = asyncio.run(main())
    with pytest.raises(EngineFailure, match="bookkeeping broke"):
        queued.future.result()
    assert "bookkeeping broke" in scorer._failure and exits == [True] and not scorer._queue


def test_an_adapter_check_past_its_time_is_given_up_and_not_started_again_while_it_runs():
    """The ingress's checks (serve_app/adapter_checks.py): one that does not return in its time
    is refused (its thread cannot be stopped), and the same directory is not checked again
    while that thread runs; one that could not start (every thread held) is refused saying
    so and does not run later; once the stuck read returns, both are checked anew."""
    import threading

    from serve_app.adapter_checks import AdapterChecks, CheckStillRunning, CheckTimedOut

    checks = AdapterChecks(threads=1)
    stuck = threading.Event()
    ran: list[str] = []

    def refuse() -> None:
        raise ValueError("no adapter")

    async def main() -> None:
        with pytest.raises(CheckTimedOut, match=r"within check_timeout_s=0\.2 s \(its files"):
            await checks.run("/stuck", stuck.wait, 0.2)
        with pytest.raises(CheckStillRunning, match="deploy the user_config again"):
            await checks.run("/stuck", lambda: ran.append("stuck"), 60)
        with pytest.raises(CheckTimedOut, match="never started, every one of the 1 check"):
            await checks.run("/other", lambda: ran.append("other"), 0.2)
        stuck.set()  # the read returns at last
        for _ in range(600):
            await asyncio.sleep(0.1)
            try:
                assert await checks.run("/stuck", lambda: "checked again", 60) == "checked again"
                break
            except CheckStillRunning:
                continue
        else:
            raise AssertionError("never checked again")
        assert await checks.run("/other", lambda: "checked", 60) == "checked"
        with pytest.raises(ValueError, match="no adapter"):
            await checks.run("/other", refuse, 60)
        assert ran == []  # neither refused check ran later

    try:
        asyncio.run(main())
    finally:
        stuck.set()  # a failure above must not leave the thread (and the run) blocked
