"""Scorer replica: one engine (on one host, or spanning a multi-host slice), fed by a continuous
batcher.

Chunks from any number of concurrent requests queue up in the replica. One batcher task takes
about one forward's worth of them (query tokens counted once per distinct query) as soon as the
engine is free, runs them through the engine in a worker thread (chunks keep arriving
meanwhile), and answers each. So an idle replica dispatches a chunk at once, and a busy one
packs everything that arrived during its last forward into the next: no fixed batching wait,
no batch size to tune.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from models.checkpoint import cache_root, ensure_demo_checkpoint, has_random_weights
from models.engine import Engine, ScoringEngine, use_compilation_cache
from models.inputs import Chunk, EngineBroken, ScoringInputError
from serve_app import metrics
from serve_app.chunk_call import (
    AdapterLoading,
    ChunkFailure,
    ChunkResult,
    EngineFailure,
    Misdelivered,
)
from serve_app.config import ScorerArgs, deployment_identity, scoring_key
from serve_app.routing import QueryAffinityRouter
from serve_app.slice import SliceEngine

log = logging.getLogger("ray.serve")


def _route_engine_logs() -> None:
    """Send the engine's INFO logs (loads, warm-up, compilations) to this replica's Serve log."""
    engine_log = logging.getLogger("models")
    engine_log.setLevel(logging.INFO)
    for handler in log.handlers:
        if handler not in engine_log.handlers:
            engine_log.addHandler(handler)
    engine_log.propagate = False


class _RuntimeAdapters:
    """The adapters added at run time (the ingress's user_config), as this replica serves them.

    Every chunk call lists them, (name, directory, sha256 of its files) each. A chunk naming
    one the engine does not hold yet starts reading it (a thread of its own, beside the
    forwards) and is refused (AdapterLoading: its request gets a 503 with Retry-After); the
    batcher adds it to the engine between two engine calls. The engine serves each under
    `name (directory, digest)`, so a name pointed at other files is another adapter (its own
    prefix-cache key), and a chunk queued for the old one is never scored with the new
    weights; files that differ from those the ingress checked are refused, never served. One
    no longer listed leaves the engine once no queued chunk names it."""

    FAILED_READ_S = 10.0  # a failed read is tried again after this (a passing I/O error)

    def __init__(self) -> None:
        self.table: tuple[tuple[str, str, str], ...] = ()
        self._served: set[str] = set()  # engine names of the run-time adapters it holds
        self._reading: dict[str, asyncio.Future] = {}  # engine name -> its check_adapter
        self._failed: dict[str, tuple[float, str]] = {}  # engine name -> (when, why)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "adapter-read")

    @staticmethod
    def engine_name(name: str, directory: str, digest: str) -> str:
        return f"{name} ({directory}, sha256 {digest[:12]})"

    def admit(self, chunk: Chunk, table: tuple, engine: Engine, wake) -> Chunk:
        """`chunk` renamed to its adapter's engine name; AdapterLoading (or the adapter's
        read error, a ChunkFailure) while the engine does not hold it."""
        self.table = table
        entry = next((e for e in table if e[0] == chunk.adapter), None)
        if entry is None:
            return chunk
        name = self.engine_name(*entry)
        if name in self._served:
            return dataclasses.replace(chunk, adapter=name)
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < self.FAILED_READ_S:
            raise ChunkFailure(f"model: adapter {chunk.adapter!r}: {failed[1]}")
        if name not in self._reading:
            self._failed.pop(name, None)
            log.info("adapter %s: reading", name)
            loop = asyncio.get_running_loop()
            reading = loop.run_in_executor(self._pool, engine.check_adapter, entry[1], entry[2])
            reading.add_done_callback(lambda _: wake())
            self._reading[name] = reading
        raise AdapterLoading(
            f"model: adapter {chunk.adapter!r} is being loaded on a scorer replica"
        )

    def apply(self, engine: Engine, chunks: list[Chunk]) -> None:
        """Run-time adapters read since the last call join `engine`; those no longer listed
        and named by none of `chunks` (queued) leave it."""
        for name, reading in list(self._reading.items()):
            if not reading.done():
                continue
            del self._reading[name]
            if (error := reading.exception()) is not None:
                self._failed[name] = (time.monotonic(), f"{type(error).__name__}: {error}")
                log.error("adapter %s: read failed: %s", name, error)
                continue
            engine.register_adapter(name, reading.result())
            self._served.add(name)
        listed = {self.engine_name(*e) for e in self.table}
        needed = {c.adapter for c in chunks}
        for name in self._served - listed - needed:
            engine.remove_adapter(name)
            self._served.discard(name)
            log.info("adapter %s: removed (no longer in the ingress's user_config)", name)


# A chunk every engine can score (one query token, one item token, one label): after a batch
# failed and none of its chunks scores alone, this tells a broken replica from bad chunks.
_PROBE = Chunk((0,), ((0,),), (0,), True)


class _Hung(RuntimeError):
    """A forward ran past forward_timeout_s."""


@dataclasses.dataclass
class _Pending:
    chunk: Chunk
    future: asyncio.Future
    arrived: float


def _warmup_part() -> tuple[int, int]:
    """(rank, replicas) of this replica in its deployment, so that replicas starting together
    compile their warm-up shapes in staggered orders (models/engine.py staggered); (0, 1)
    where Serve gives no rank (or no fixed replica count)."""
    ctx = serve.get_replica_context()
    n = ctx.world_size
    if ctx.rank is None or not isinstance(n, int) or n < 1:
        return 0, 1
    return ctx.rank.rank, n


# max_ongoing_requests: chunk calls one replica holds; with the batcher they share forwards,
# so it bounds the queue, not the batch. Replicas are chosen by query affinity (routing.py).
@serve.deployment(
    name="Scorer",
    max_ongoing_requests=64,
    health_check_period_s=10,
    request_router_config=RequestRouterConfig(request_router_class=QueryAffinityRouter),
)
class Scorer:
    """Loads the model and, unless told not to, compiles every shape it can run before it
    reports healthy."""

    def __init__(self, args: ScorerArgs):
        _route_engine_logs()
        use_compilation_cache(cache_root() / "jax")  # a restarted replica starts in seconds
        self.args = ScorerArgs.model_validate(args)
        self._failure: str | None = None
        # The running forward: when it started, and the engine's compile_seconds() then (a
        # deadline counts the forward's time less what it spent compiling).
        self._busy_since: tuple[float, float] | None = None
        path = str(self.args.model.path or ensure_demo_checkpoint(self.args.model.demo_preset))
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.key = scoring_key(self.args.model, self.args.engine, deployment_identity(ctx.app_name))
        p = self.args.placement
        self.engine: Engine
        if p.hosts_per_replica > 1:
            self.engine = SliceEngine(
                path,
                self.args.engine,
                p.hosts_per_replica,
                {"num_cpus": p.host_num_cpus, "resources": p.host_resources},
                self.args.call_timeout_s,
                name=f"SliceHost:{self.replica}",
                tpu_slice=None if p.tpu_topology is None else (p.tpu_topology, p.tpu_version),
                adapters=self.args.model.adapters,
            )
        else:
            self.engine = ScoringEngine(path, self.args.engine, self.args.model.adapters)
        if has_random_weights(path):
            log.warning("replica %s serves RANDOM WEIGHTS from %s", self.replica, path)
        self.warmup = self.engine.warmup(_warmup_part()) if self.args.warmup else None
        self._stats = self.engine.stats()  # counters at the end of warm-up
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._runtime = _RuntimeAdapters()
        log.info("replica %s ready: %s, warm-up %s", self.replica, self.args.engine, self.warmup)

    async def score(
        self,
        chunk: Chunk,
        part: tuple[int, int] = (0, 1),
        key: str | None = None,
        avoid: tuple[str, ...] = (),
        ticket: int | None = None,
        adapters: tuple[tuple[str, str, str], ...] = (),
    ) -> ChunkResult | AdapterLoading:
        """The chunk's scores, from the next forward that has room for it (AdapterLoading while
        its run-time adapter is being read here). `part`: which of
        its request's chunks it is, (i, k), `avoid`: replicas that failed it already, and
        `ticket`: the call's, under which the router keeps the replica it picked; all read by
        the router (routing.py), not here. `key`: the sender's scoring_key (its deployment and
        settings); a chunk for another key is refused (Misdelivered). `adapters`: those added
        at run time, (name, directory, digest) each (_RuntimeAdapters)."""
        if key is not None and key != self.key:
            log.warning(
                "replica %s: refused a chunk for key %s (this replica's: %s): sent by another "
                "deployment or for other settings",
                self.replica,
                key,
                self.key,
            )
            raise Misdelivered(f"replica {self.replica}: chunk for key {key}, not {self.key}")
        if self._failure is not None:  # a broken engine (a slice's hosts may hang) is not used
            raise EngineFailure(f"replica {self.replica}: {self._failure}")
        loop = asyncio.get_running_loop()
        if self._batcher is None:  # started here: __init__ runs outside the event loop
            self._wake = asyncio.Event()
            self._batcher = loop.create_task(self._run_batches())
        if adapters or self._runtime.table:
            try:
                chunk = self._runtime.admit(chunk, adapters, self.engine, self._wake.set)  # type: ignore[union-attr]
            except AdapterLoading as e:
                # Answered, not raised: Serve logs a traceback for every exception a replica's
                # method raises, and this one is routine (the caller retries later).
                return e
        pending = _Pending(chunk, loop.create_future(), time.perf_counter())
        self._queue.append(pending)
        self._wake.set()  # type: ignore[union-attr]
        # Cancelling this call (a deadline) cancels the future: the batcher then skips it.
        result = await pending.future
        if isinstance(result, ScoringInputError | ChunkFailure):
            raise result
        return ChunkResult(scores=result, replica=self.replica)

    def _take(self) -> list[_Pending]:
        """The queue's oldest chunks, about one forward's worth of tokens."""
        budget = self.args.engine.max_batch_tokens
        batch: list[_Pending] = []
        queries: set[tuple[int, ...]] = set()
        tokens = 0
        while self._queue and (not batch or tokens < budget):
            p = self._queue.popleft()
            if p.future.done():  # cancelled while waiting
                continue
            c = p.chunk
            tokens += sum(map(len, c.items)) + (0 if c.query in queries else len(c.query))
            queries.add(c.query)
            batch.append(p)
        return batch

    async def _run_batches(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._apply_adapters([]):
                return
            while batch := self._take():
                if not self._apply_adapters(batch):
                    return
                m, start = metrics.scorer(), time.perf_counter()
                for p in batch:
                    m.queue_wait.observe(start - p.arrived)
                m.batch_chunks.observe(len(batch))
                chunks = [p.chunk for p in batch]
                try:
                    out = await self._forward_in_time(chunks)
                except (_Hung, EngineBroken) as e:  # scoring one by one would not help
                    return self._fail(e, batch)
                except Exception as e:  # not a bad input: the engine, or one of the chunks
                    if (out := await self._isolate(chunks, e)) is None:
                        return self._fail(e, batch)
                m.batch_latency.observe(time.perf_counter() - start)
                for p, result in zip(batch, out, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)

    def _apply_adapters(self, batch: list[_Pending]) -> bool:
        """Between engine calls: run-time adapters read since the last one join the engine,
        those no longer listed that no queued chunk names leave it. False (the replica
        failed) if that raised: the engine's adapter state is then unknown."""
        try:
            self._runtime.apply(self.engine, [p.chunk for p in (*batch, *self._queue)])
        except Exception as e:
            self._fail(e, batch)
            return False
        return True

    async def _forward_in_time(self, chunks: list[Chunk]) -> list:
        """One engine call in a worker thread, within forward_timeout_s not counting the time
        it spends compiling (with warm-up off, a first compile can take minutes and is not a
        hang). Past it: _Hung; the thread cannot be stopped, so the replica is replaced."""
        limit = self.args.forward_timeout_s
        self._busy_since = (time.monotonic(), self.engine.compile_seconds())
        try:
            work = asyncio.ensure_future(asyncio.to_thread(self._forward, chunks))
            while (left := limit - self._busy_s()) > 0:
                done, _ = await asyncio.wait({work}, timeout=left)
                if done:
                    break
            else:
                raise _Hung(
                    f"a forward of {len(chunks)} chunks ran past forward_timeout_s={limit} "
                    "(compiling not counted)"
                )
            out, stats = work.result()
        finally:
            self._busy_since = None
        self._record_stats(stats)
        return out

    def _busy_s(self) -> float:
        """Seconds the running forward has taken, less its compiles; 0 when none runs."""
        if (busy := self._busy_since) is None:
            return 0.0
        started, compiled = busy
        return time.monotonic() - started - (self.engine.compile_seconds() - compiled)

    async def _isolate(self, chunks: list[Chunk], error: Exception) -> list | None:
        """After a failed engine call: each chunk alone, so one bad chunk fails only its own
        request. None when the replica itself is broken (no chunk scores alone, and neither
        does a probe every engine can score)."""
        log.warning(
            "replica %s: an engine call of %d chunks failed (%s: %s); scoring them one by one",
            self.replica,
            len(chunks),
            type(error).__name__,
            error,
        )
        out: list = []
        for c in chunks:
            try:
                out += await self._forward_in_time([c])
            except _Hung:
                return None
            except Exception as e:
                failed = f"{type(e).__name__}: {e}"
                out.append(ChunkFailure(f"replica {self.replica}: scoring failed: {failed}"))
        if all(isinstance(r, ChunkFailure) for r in out):
            try:
                await self._forward_in_time([_PROBE])
            except Exception:
                return None
        bad = sum(isinstance(r, ChunkFailure) for r in out)
        log.error(
            "replica %s: %d of %d chunks fail on their own (their requests get a 500); the "
            "engine scores the others and stays in service",
            self.replica,
            bad,
            len(chunks),
        )
        return out

    def _forward(self, chunks: list[Chunk]) -> tuple[list, dict[str, int]]:
        # The counters are read here, off the event loop: a slice's are a remote call.
        return self.engine.score(chunks), self.engine.stats()

    def _fail(self, e: Exception, batch: list[_Pending]) -> None:
        self._failure = f"{type(e).__name__}: {e}"
        log.error("replica %s: engine failure; asking Ray to replace it", self.replica, exc_info=e)
        failure = EngineFailure(f"replica {self.replica}: {self._failure}")
        for p in [*batch, *self._queue]:
            if not p.future.done():
                p.future.set_exception(failure)
        self._queue.clear()
        # Gone at once rather than at the next health check: until then the router would keep
        # picking this replica (it answers fastest, with an error). Chunks it holds fail with
        # RayActorError and the ingress retries them elsewhere.
        asyncio.get_running_loop().call_soon(self._exit)

    def _record_stats(self, stats: dict[str, int]) -> None:
        """Engine counters since the last batch -> metrics (compilations: after warm-up)."""
        m = metrics.scorer()
        delta = {k: v - self._stats.get(k, 0) for k, v in stats.items()}
        self._stats = stats
        counters = {
            "items": m.items,
            "prefix_hits": m.prefix_hits,
            "prefix_misses": m.prefix_misses,
            "forwards": m.forwards,
        }
        for key, counter in counters.items():
            if delta.get(key):  # Ray counters refuse increments of 0
                counter.inc(delta[key])
        if delta.get("compiles"):
            m.compiles_after_warmup.inc(delta["compiles"])
            log.warning(
                "replica %s compiled %d programs after warm-up (see 'compiled' lines): "
                "that stalled its traffic",
                self.replica,
                delta["compiles"],
            )

    def _exit(self) -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=False)

    def stats(self, replica: str | None = None) -> dict[str, int]:
        """This replica's engine counters: items, forwards, tokens, prefix hits/misses,
        compiles. `replica`: the replica (id) to ask, read by the router (routing.py)."""
        return self.engine.stats()

    def check_health(self) -> None:
        """Unhealthy after an engine failure or while a forward runs past forward_timeout_s,
        so Serve replaces this replica."""
        if self._failure is not None:
            raise RuntimeError(f"engine failed: {self._failure}")
        limit = self.args.forward_timeout_s
        if self._busy_s() > limit:
            raise RuntimeError(f"a forward has run past forward_timeout_s={limit}")
