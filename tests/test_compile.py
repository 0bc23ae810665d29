"""After warm-up, a stream of requests with varied item counts and lengths compiles nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from models.engine import EngineConfig, ScoringEngine
from models.inputs import Chunk

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


@pytest.mark.parametrize(
    ("mode", "rows"), [("serial", 1), ("packed", 1), ("prefix", 1), ("prefix", 4)]
)
def test_no_compilation_after_warmup(ckpts, mode, rows):
    eng = ScoringEngine(ckpts["qwen3"], EngineConfig(mode=mode, chunk_size=16, max_batch_rows=rows))
    # Envelope: queries of 10..60 tokens, items of 1..24 tokens, 2 or 3 labels.
    compiled = eng.warmup(query_tokens=(10, 60), item_tokens=(1, 24), num_labels=(2, 3))
    assert compiled > 0
    before = len(COMPILES)
    rng = np.random.default_rng(0)
    for _ in range(10):
        chunks = []
        for _ in range(int(rng.integers(1, 4))):  # one to three requests at once
            query = rng.integers(0, 151_000, int(rng.integers(10, 61))).tolist()
            items = [
                rng.integers(0, 151_000, int(rng.integers(1, 25))).tolist()
                for _ in range(int(rng.integers(1, 50)))
            ]
            labels = rng.choice(151_000, int(rng.integers(2, 4)), replace=False).tolist()
            chunks.append(
                Chunk(
                    tuple(query),
                    tuple(map(tuple, items)),
                    tuple(labels),
                    apply_softmax=bool(rng.integers(2)),
                )
            )
        for c, out in zip(chunks, eng.score_chunks(chunks), strict=True):
            assert out.shape == (len(c.items), len(c.label_ids))
    assert len(COMPILES) == before, f"{len(COMPILES) - before} compilations after warm-up"
    # ...and the listener does see compilations: a new bucket compiles.
    eng.score_ids(list(range(1, 200)), [[1] * 100], [5, 6])
    assert len(COMPILES) > before
