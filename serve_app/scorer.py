"""Scorer replica: one engine per replica (on one host, or spanning a multi-host slice), chunks
from concurrent requests batched together."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import ray
from ray import serve

from models.checkpoint import ensure_demo_checkpoint, has_random_weights
from models.engine import ScoringEngine
from models.inputs import Chunk, ScoringInputError
from serve_app import metrics
from serve_app.config import AppArgs
from serve_app.slice import SliceEngine

log = logging.getLogger("ray.serve")


def _route_engine_logs() -> None:
    """Send the engine's INFO logs (loads, warm-up, new shapes) to this replica's Serve log."""
    engine_log = logging.getLogger("models")
    engine_log.setLevel(logging.INFO)
    for handler in log.handlers:
        if handler not in engine_log.handlers:
            engine_log.addHandler(handler)
    engine_log.propagate = False


class EngineFailure(RuntimeError):
    """This replica's engine failed (not a bad input: e.g. a slice host died). The ingress
    retries the chunk on another replica; Serve replaces this one (check_health)."""


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    scores: np.ndarray  # [items, labels]
    replica: str  # which replica scored it (the ingress reports these)


# max_ongoing_requests bounds what one replica holds (two batches of 8 chunks); beyond it the
# router must pick another replica, which spreads a burst of chunks over the replicas.
@serve.deployment(name="Scorer", max_ongoing_requests=16, health_check_period_s=10)
class Scorer:
    """Loads the model and compiles the warm-up buckets before it reports healthy."""

    def __init__(self, args: dict[str, Any]):
        _route_engine_logs()
        self.args = AppArgs.model_validate(args)
        self._failure: str | None = None
        path = self.args.model_path or ensure_demo_checkpoint(self.args.demo_preset)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine: ScoringEngine | SliceEngine
        if self.args.hosts_per_replica > 1:
            self.engine = SliceEngine(
                str(path),
                self.args.engine_config(),
                self.args.hosts_per_replica,
                {"num_cpus": self.args.host_num_cpus, "resources": self.args.host_resources},
                self.args.request_timeout_s,
                name=f"SliceHost:{self.replica}",
                tpu_slice=(
                    None
                    if self.args.tpu_topology is None
                    else (self.args.tpu_topology, self.args.tpu_version)
                ),
            )
        else:
            self.engine = ScoringEngine(path, self.args.engine_config())
        if has_random_weights(path):
            log.warning("replica %s serves RANDOM WEIGHTS from %s", self.replica, path)
        if self.args.warmup_query_tokens is not None:
            self.engine.warmup(
                self.args.warmup_query_tokens,
                self.args.warmup_item_tokens,
                self.args.warmup_num_labels,
            )
        self._stats = dict(self.engine.stats)  # counters at the end of warm-up
        self._score_batch.set_max_batch_size(self.args.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        log.info("replica %s ready: %s", self.replica, self.engine.config)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings: `max_batch_size`, `batch_wait_timeout_s`."""
        if "max_batch_size" in user_config:
            self._score_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._score_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def score(self, chunk: Chunk) -> ChunkResult:
        if self._failure is not None:  # a broken engine (a slice's hosts may hang) is not used
            raise EngineFailure(f"replica {self.replica}: {self._failure}")
        result = await self._score_batch((chunk, time.perf_counter()))
        if isinstance(result, ScoringInputError):
            raise result
        return ChunkResult(scores=result, replica=self.replica)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _score_batch(
        self, arrivals: list[tuple[Chunk, float]]
    ) -> list[np.ndarray | ScoringInputError]:
        m, start = metrics.scorer(), time.perf_counter()
        for _, arrived in arrivals:
            m.queue_wait.observe(start - arrived)
        chunks = [c for c, _ in arrivals]
        # The forward runs in a thread so this replica keeps queueing chunks meanwhile.
        try:
            out, stats = await asyncio.to_thread(self._forward, chunks)
        except Exception as e:  # not a bad input: the engine itself failed
            self._failure = f"{type(e).__name__}: {e}"
            log.exception("replica %s: engine failure; asking Ray to replace it", self.replica)
            # Gone at once rather than at the next health check: until then the router would
            # keep picking this replica (it answers fastest, with an error). Chunks it holds
            # fail with RayActorError and the ingress retries them elsewhere.
            asyncio.get_running_loop().call_soon(self._exit)
            raise EngineFailure(f"replica {self.replica}: {self._failure}") from e
        m.batch_latency.observe(time.perf_counter() - start)
        self._record_stats(stats)
        return out

    def _forward(self, chunks: list[Chunk]) -> tuple[list, dict[str, int]]:
        # The counters are read here, off the event loop: a slice's are a remote call.
        return self.engine.score_chunks(chunks), dict(self.engine.stats)

    def _record_stats(self, stats: dict[str, int]) -> None:
        """Engine counters since the last batch -> metrics (compilations: after warm-up)."""
        m = metrics.scorer()
        delta = {k: v - self._stats.get(k, 0) for k, v in stats.items()}
        self._stats = stats
        for counter, key in ((m.items, "items"), (m.prefix_hits, "prefix_hits"),
                             (m.prefix_misses, "prefix_misses")):  # fmt: skip
            if delta.get(key):  # Ray counters refuse increments of 0
                counter.inc(delta[key])
        if delta.get("compiles"):
            m.compiles_after_warmup.inc(delta["compiles"])
            log.warning(
                "replica %s compiled %d new shapes after warm-up (see 'compiling shape' lines); "
                "widen the warm-up envelope to avoid these stalls",
                self.replica,
                delta["compiles"],
            )

    def _exit(self) -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=False)

    def stats(self) -> dict[str, int]:
        """This replica's engine counters: items, forwards, prefix hits/misses, compiles."""
        return dict(self.engine.stats)

    def check_health(self) -> None:
        """Unhealthy after an engine failure, so Serve replaces this replica."""
        if self._failure is not None:
            raise RuntimeError(f"engine failed: {self._failure}")
