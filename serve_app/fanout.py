"""The chunk calls of one HTTP request, for every route alike: each chunk sent to a scorer
replica (retried on another when its replica fails), every chunk of every score request the
HTTP request holds under one deadline, and one way out that cancels what is still running.

A score request (a job) of the HTTP request fails on its own when one of its chunks does
(ChunkFailure, ScoringInputError): its other chunks are cancelled, the other jobs go on. What
no job can be answered through (the deadline, the scorers overloaded or failing on every try,
anything unexpected, the client going away) ends the whole request, every outstanding chunk
call of it cancelled (a chunk still queued in a scorer is dropped there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Sequence

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from models.inputs import Chunk, ScoringInputError
from serve_app import metrics, routing
from serve_app.chunk_call import AdapterLoading, ChunkFailure, ChunkResult, EngineFailure
from serve_app.errors import ErrorKind

log = logging.getLogger("ray.serve")


class ReplicaFailure(Exception):
    """No scorer replica could take a chunk: its replicas failed on every try (`kind`
    UNAVAILABLE), or they are all full (OVERLOADED)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.UNAVAILABLE):
        super().__init__(message)
        self.kind = kind


class DeadlineExceeded(Exception):
    """The request ran past its deadline (limits.request_timeout_s)."""


# What fails one job of a request and no other (the same chunk would fail on any replica).
JOB_FAILURES = (ChunkFailure, ScoringInputError)

_REPLICA = re.compile(r"replica (\w+): ")


def failed_replica(e: Exception) -> str | None:
    """The replica an EngineFailure / Misdelivered / ChunkFailure names (they start so)."""
    m = _REPLICA.search(str(e))
    return m[1] if m else None


def cause(e: BaseException) -> BaseException:
    """The exception a scorer raised, without Ray's wrapper (whose text holds a traceback)."""
    return getattr(e, "cause", None) or e


def _retrieve(task: asyncio.Future) -> None:
    """A chunk task's outcome, read so that one abandoned by a cancelled request (its client
    went away) logs no 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()


@dataclasses.dataclass(frozen=True)
class ChunkCaller:
    """Sends one chunk to a scorer replica, retried on another (bounded) when its replica
    dies, its engine fails or it refuses the chunk as not its own, so a request gets all of its
    scores or an error, never part of them. A chunk that fails on its own (ChunkFailure) is not
    retried: it would fail the same way anywhere."""

    scorer: DeploymentHandle
    key: str  # the scoring key a scorer checks (serve_app.config.scoring_key)
    retries: int
    # The adapters added at run time ((name, directory, digest), sorted), sent with every
    # chunk: a scorer reads one it has not yet, and drops those no longer listed.
    adapters: tuple[tuple[str, str, str], ...] = ()

    async def __call__(
        self, chunk: Chunk, part: tuple[int, int], pending: list[DeploymentResponse]
    ) -> ChunkResult:
        start, tries = time.perf_counter(), self.retries + 1
        avoid: list[str] = []
        for attempt in range(tries):
            ticket = routing.new_ticket()
            response = self.scorer.score.remote(
                chunk,
                part=part,
                key=self.key,
                avoid=tuple(avoid),
                ticket=ticket,
                adapters=self.adapters,
            )
            pending.append(response)
            try:
                result = await response
            except BackPressureError as e:
                raise ReplicaFailure(f"scorers overloaded ({e})", ErrorKind.OVERLOADED) from e
            except ChunkFailure as e:
                i, k = part
                raise ChunkFailure(f"chunk {i + 1} of {k}: {cause(e)}") from e
            except (RayActorError, ActorUnavailableError, EngineFailure) as e:
                # The replica the router sent the call to: what answered at its address may
                # be no replica of ours (Misdelivered), and a dead one names nobody.
                answered = failed_replica(e) if isinstance(e, EngineFailure) else None
                replica = routing.picked(ticket) or answered
                avoid += [replica] if replica else []
                log.warning(
                    "chunk of %d items: scorer replica %s failed (try %d of %d): %s%s",
                    len(chunk.items),
                    replica or "?",
                    attempt + 1,
                    tries,
                    type(e).__name__,
                    "" if answered in (None, replica) else f" (answered by {answered})",
                )
                # Give the router a moment to learn the replica is gone, or the retry may
                # be routed to it again.
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            finally:
                routing.picked(ticket)  # the pick is not needed once the call is over
            if isinstance(result, AdapterLoading):  # answered by the replica, not raised
                raise ReplicaFailure(str(result), ErrorKind.UNAVAILABLE)
            metrics.ingress().chunk_latency.observe(time.perf_counter() - start)
            return result
        raise ReplicaFailure(f"scorer replicas failed {tries} times for one chunk")


@dataclasses.dataclass
class _Job:
    """One job's chunk calls: the tasks (chunk order) and every call sent (retries too)."""

    tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)
    pending: list[DeploymentResponse] = dataclasses.field(default_factory=list)

    def cancel(self) -> None:
        for r in self.pending:  # chunks not started yet are dropped from the scorers' queues
            r.cancel()
        for t in self.tasks:
            t.cancel()


class FanOut:
    """Every chunk of every job of one request, sent at once (`run`)."""

    def __init__(self, call: ChunkCaller, jobs: Sequence[Sequence[Chunk]]):
        self._jobs = [_Job() for _ in jobs]
        self._owner: dict[asyncio.Task, int] = {}
        for j, chunks in enumerate(jobs):
            for i, chunk in enumerate(chunks):
                task = asyncio.ensure_future(call(chunk, (i, len(chunks)), self._jobs[j].pending))
                task.add_done_callback(_retrieve)
                self._jobs[j].tasks.append(task)
                self._owner[task] = j

    @property
    def calls(self) -> int:
        """Chunk calls sent so far (retries included)."""
        return sum(len(j.pending) for j in self._jobs)

    def cancel(self) -> None:
        for job in self._jobs:
            job.cancel()

    async def run(self, deadline: float) -> list[list[ChunkResult] | Exception]:
        """Per job, its chunks' results in chunk order, or the failure that is its own. Raises
        DeadlineExceeded past `deadline` (time.monotonic()), ReplicaFailure, or whatever else
        a chunk call raised, and CancelledError when the request is cancelled: each with every
        outstanding chunk call cancelled."""
        failed: dict[int, Exception] = {}
        waiting = set(self._owner)
        try:
            while waiting:
                done, waiting = await asyncio.wait(
                    waiting,
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_EXCEPTION,
                )
                if not done:
                    raise DeadlineExceeded
                waiting -= self._fail_jobs(done, failed)
                for task in done:  # the request's own failures, in jobs still answerable
                    e = task.exception()
                    if e is not None and self._owner[task] not in failed:
                        raise e
        except BaseException:
            self.cancel()
            raise
        return [
            failed.get(j) or [t.result() for t in job.tasks] for j, job in enumerate(self._jobs)
        ]

    def _fail_jobs(self, done: set[asyncio.Task], failed: dict[int, Exception]) -> set:
        """Jobs with a chunk that failed on its own: noted, their other chunks cancelled;
        returns those chunks' tasks (no longer waited for)."""
        dropped: set[asyncio.Task] = set()
        for task in done:
            e, j = task.exception(), self._owner[task]
            if isinstance(e, JOB_FAILURES) and j not in failed:
                failed[j] = e
                self._jobs[j].cancel()
                dropped |= set(self._jobs[j].tasks)
        return dropped
