"""Our Prometheus metrics, beside Ray Serve's built-in ones (request counts, latencies, replica
counts, queue lengths). Made with `ray.serve.metrics`, so Serve tags each series with the
deployment, replica and application; Ray exports them on every node's metrics port with the
`ray_` prefix (README: Metrics). Created lazily, inside the replica that records them.
"""

from __future__ import annotations

import functools

from ray.serve import metrics

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class IngressMetrics:
    def __init__(self) -> None:
        self.request_latency = metrics.Histogram(
            "mis_request_latency_s",
            description="Latency of answered scoring requests (200), by route.",
            boundaries=LATENCY_S,
            tag_keys=("route",),
        )
        self.chunks = metrics.Histogram(
            "mis_request_chunks",
            description="Chunks one scoring request was split into (its fan-out).",
            boundaries=COUNTS,
        )
        self.chunk_latency = metrics.Histogram(
            "mis_chunk_latency_s",
            description="One chunk from the ingress to a scorer and back, retries included.",
            boundaries=LATENCY_S,
        )
        self.items = metrics.Counter(
            "mis_request_items_total",
            description="Items (documents) of answered requests, by route.",
            tag_keys=("route",),
        )
        self.tokens = metrics.Counter(
            "mis_request_tokens_total",
            description="Prompt tokens (query + items) of answered requests, by route.",
            tag_keys=("route",),
        )
        self.errors = metrics.Counter(
            "mis_errors_total",
            description="Error responses by HTTP status code (4xx: the client's; 5xx: ours).",
            tag_keys=("code",),
        )


class ScorerMetrics:
    def __init__(self) -> None:
        self.items = metrics.Counter(
            "mis_items_scored_total", description="Items scored by this replica's engine."
        )
        self.queue_wait = metrics.Histogram(
            "mis_queue_wait_s",
            description="Time a chunk waits in the scorer replica before its batch starts.",
            boundaries=LATENCY_S,
        )
        self.batch_latency = metrics.Histogram(
            "mis_batch_latency_s",
            description="Engine time of one batch of chunks (its forwards).",
            boundaries=LATENCY_S,
        )
        self.batch_chunks = metrics.Histogram(
            "mis_batch_chunks",
            description="Chunks (of any requests) the batcher packed into one engine call.",
            boundaries=COUNTS,
        )
        self.forwards = metrics.Counter(
            "mis_forwards_total", description="Forwards (body + LM head programs) run."
        )
        self.prefix_hits = metrics.Counter(
            "mis_prefix_cache_hits_total", description="Query prefills found in the cache."
        )
        self.prefix_misses = metrics.Counter(
            "mis_prefix_cache_misses_total", description="Query prefills computed."
        )
        self.compiles_after_warmup = metrics.Counter(
            "mis_compilations_after_warmup_total",
            description="Programs compiled after the replica's warm-up: 0 whatever the requests "
            "(the warm-up compiles every shape the engine can run); each costs seconds.",
        )


@functools.cache
def ingress() -> IngressMetrics:
    return IngressMetrics()


@functools.cache
def scorer() -> ScorerMetrics:
    return ScorerMetrics()
