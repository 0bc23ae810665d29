"""What a chunk call (ingress -> Scorer) returns or raises. The ingress unpickles these, so
they live apart from the Scorer: unpickling a class imports its module, and scorer.py imports
the engine and JAX, which the ingress process never loads (tests/test_serve.py checks it)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    scores: np.ndarray  # [items, labels]
    replica: str  # which replica scored it (the ingress reports these)


class EngineFailure(RuntimeError):
    """This replica's engine failed (not a bad input: e.g. a slice host died, or a forward ran
    past `forward_timeout_s`). The ingress retries the chunk on another replica; Serve replaces
    this one (check_health)."""


class Misdelivered(EngineFailure):
    """A chunk call that reached a replica of another deployment (another Ray cluster or
    application on the same host) or of other scoring settings: refused, and retried on another
    replica like a failed replica's. This replica is fine."""


class ChunkFailure(RuntimeError):
    """This chunk failed on its own, on a replica that scores other chunks fine (an engine bug
    on one input shape, a host-memory error on one huge chunk): its request gets a 500 that
    says so, and nothing else is affected. Not retried: it would fail the same way elsewhere."""


class AdapterLoading(RuntimeError):
    """The chunk's adapter, added at run time, is being read on the replica the chunk reached:
    its request gets a 503 with Retry-After (never a wait of unknown length). The replica
    returns it rather than raising it (routine, not a failure to log with a traceback)."""
