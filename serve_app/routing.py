"""Query-affinity routing of chunk calls to scorer replicas (Ray Serve's request router API).

A replica keeps the K/V of the queries it prefilled (prefix mode), so the chunks of one query,
and later requests with the same query, are cheapest on a replica that already holds it. Each
query ranks the replicas by rendezvous hashing of its tokens over the replica ids: every ingress
replica agrees without shared state, and adding or removing a replica moves only the queries it
wins or held. A request of one chunk prefers the query's first replica; a request of k chunks
is dealt over the first min(k, replicas) of that ranking in consecutive runs (chunk i of k
prefers replica i * width // k), so a big request is scored on up to all replicas at once, and
each of them prefills the query once and keeps it for the next request with that query. The
price: a new query is prefilled once per replica it is dealt over (for a query as long as the
request's items, that is up to twice the work on the first request; repeats are cache hits).
(Serve hands a replica, once chosen, to the oldest waiting call of the ingress, so under
concurrency a chunk may take another chunk's preferred replica.) The preferred replica gets it
unless it holds more than `spill_threshold` chunks beyond the least loaded candidate (by
this router's count of the calls it has sent there and not seen complete: probed queue lengths
lag a burst); then the least loaded one does, so a hot query never starves the other replicas.
Ray's PrefixCacheAffinityRouter (ray.llm) is the idea this follows, for token ids instead of
prompt text and without its shared prefix-tree actor.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import threading
from typing import Any

import numpy as np
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from models.inputs import Chunk

# Scorer replicas each router of this process can send chunks to now (running, past their
# warm-up and health checks), by the deployment it routes for: the ingress' readiness.
_RUNNING: dict[str, int] = {}


def running_replicas(deployment: str) -> int | None:
    """Replicas ready to take a chunk of `deployment` ("app#name"), as this process' router
    last heard from the controller; None before it has heard anything."""
    return _RUNNING.get(deployment)


# The replica this process' router sent each chunk call to, by the call's `ticket` (a kwarg of
# the call, unique in this process): where a failed call went, whatever answered there. A
# process listening on one of our replicas' address (another deployment, another cluster)
# names itself in its refusal, which is no replica of ours; the router's pick is. Bounded:
# a call cancelled before its caller read its pick leaves one entry behind.
_PICKS: collections.OrderedDict[int, str] = collections.OrderedDict()
_PICKS_LOCK = threading.Lock()  # the router runs on its own event loop thread
_PICKS_KEPT = 4096
_TICKETS = itertools.count()


def new_ticket() -> int:
    """A ticket for one chunk call (`ticket=` of Scorer.score): its pick is kept under it."""
    return next(_TICKETS)


def picked(ticket: int) -> str | None:
    """The replica (id) the router sent the call with `ticket` to; None if it sent none
    (forgotten once read)."""
    with _PICKS_LOCK:
        return _PICKS.pop(ticket, None)


def _record_pick(ticket: int, replica: str) -> None:
    with _PICKS_LOCK:
        _PICKS[ticket] = replica
        while len(_PICKS) > _PICKS_KEPT:
            _PICKS.popitem(last=False)


def query_key(query: tuple[int, ...], adapter: str | None = None) -> bytes:
    """A short digest of a query's tokens and the adapter it runs with (a replica caches a
    query's K/V per adapter)."""
    data = np.asarray(query, dtype="<u4").tobytes()  # one C call, not a loop per token
    if adapter is not None:
        data += b"\0adapter:" + adapter.encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def affinity_order(key: bytes, replica_ids: list[str]) -> list[str]:
    """Replica ids, most preferred first, for a query key (rendezvous hashing)."""
    weight = lambda rid: hashlib.blake2b(key + rid.encode(), digest_size=8).digest()  # noqa: E731
    return sorted(replica_ids, key=weight, reverse=True)


# FIFOMixin: a chosen replica goes to the oldest waiting call. Without it Serve hands the
# replica to the waiting call with the same internal request id, and every chunk call of one
# HTTP request shares that id: all but one of a request's chunks would wait forever.
class QueryAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, spill_threshold: int = 4, **kwargs: Any) -> None:
        self.spill_threshold = spill_threshold
        self._outstanding: collections.Counter[ReplicaID] = collections.Counter()

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._outstanding[replica_id] += 1

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        ticket = pending_request.kwargs.get("ticket")
        if ticket is not None:
            # Through the imported module, as _publish: this class reaches the ingress by value.
            import serve_app.routing as registry

            registry._record_pick(ticket, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._outstanding[replica_id] > 0:
            self._outstanding[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._outstanding.pop(replica_id, None)
        self._publish()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish()

    def _publish(self) -> None:
        # Through the imported module: Serve ships this class to the ingress by value, with a
        # copy of this module's globals, and the ingress reads the module's own registry.
        import serve_app.routing as registry

        d = self._deployment_id
        registry._RUNNING[f"{d.app_name}#{d.name}"] = len(self.curr_replicas)

    def _load(self, replica: RunningReplica) -> int:
        return self._outstanding[replica.replica_id]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between rounds when every replica is full: without it Serve's retry
            # loop spins on this router's event loop, and the queue-length probes it waits for
            # never get their turn.
            pending_request.routing_context.should_backoff = True
        chunk = pending_request.args[0] if pending_request and pending_request.args else None
        if not isinstance(chunk, Chunk):  # stats(), health: no affinity
            wanted = pending_request.kwargs.get("replica") if pending_request else None
            if wanted is not None:  # a call for one replica (stats(replica=...))
                return [[r for r in candidate_replicas if r.replica_id.unique_id == wanted]]
            return [sorted(candidate_replicas, key=self._load)]
        # A retried chunk avoids the replicas its earlier calls were sent to and failed (or
        # were refused there as not theirs), unless no other is left.
        avoid = set(pending_request.kwargs.get("avoid", ()))  # type: ignore[union-attr]
        others = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid]
        candidate_replicas = others or candidate_replicas
        by_load = sorted(candidate_replicas, key=self._load)
        ids = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = affinity_order(query_key(chunk.query, chunk.adapter), list(ids))
        index, count = pending_request.kwargs.get("part", (0, 1))  # type: ignore[union-attr]
        count = max(1, count)
        preferred = ids[order[min(index, count - 1) * min(count, len(order)) // count]]
        if self._load(preferred) - self._load(by_load[0]) > self.spill_threshold:
            return [by_load]
        return [[preferred], [r for r in by_load if r is not preferred]]
