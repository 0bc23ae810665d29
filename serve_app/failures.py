"""How a chunk call fails, as the Scorer raises it and the ingress tells the cases apart: a
module of its own so that the ingress imports them without the engine (and JAX)."""

from __future__ import annotations


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
