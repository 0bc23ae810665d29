"""After warm-up nothing compiles, whatever the mix of requests within the engine's limits."""

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
LIMITS = {"max_batch_tokens": 1024, "max_item_tokens": 32, "max_query_tokens": 300}


def _random_chunks(rng, limits: dict[str, int], max_labels: int) -> list[Chunk]:
    """One to four requests of any size inside the limits: queries 1..max tokens, 0..70 items
    of 1..max tokens, 1..max_labels labels, softmax or not, item_first sometimes."""
    chunks = []
    for _ in range(int(rng.integers(1, 5))):
        query = rng.integers(0, 151_000, int(rng.integers(1, limits["max_query_tokens"] + 1)))
        items = [
            rng.integers(0, 151_000, int(rng.integers(1, limits["max_item_tokens"] + 1)))
            for _ in range(int(rng.integers(0, 71)))
        ]
        labels = rng.choice(151_000, int(rng.integers(1, max_labels + 1)), replace=False)
        chunks.append(
            Chunk(
                tuple(query.tolist()),
                tuple(tuple(it.tolist()) for it in items),
                tuple(labels.tolist()),
                apply_softmax=bool(rng.integers(2)),
                item_first=bool(rng.integers(8) == 0),
            )
        )
    return chunks


@pytest.mark.parametrize("mode", ["serial", "packed", "prefix"])
def test_no_compilation_after_warmup(ckpts, mode):
    eng = ScoringEngine(ckpts["qwen3"], EngineConfig(mode=mode, max_labels=4, **LIMITS))
    # Compiles what equal engines of this process have not (programs are shared).
    report = eng.warmup()
    assert report["shapes"] == eng.stats()["compiles"]
    before, stats = len(COMPILES), eng.stats()["compiles"]
    rng = np.random.default_rng(0)
    for _ in range(12):
        chunks = _random_chunks(rng, LIMITS, max_labels=4)
        for c, out in zip(chunks, eng.score(chunks), strict=True):
            assert out.shape == (len(c.items), len(c.label_ids))
    assert len(COMPILES) == before, f"{len(COMPILES) - before} compilations after warm-up"
    assert eng.stats()["compiles"] == stats


def test_the_listener_sees_compilations(ckpts):
    """The check above has teeth: an engine with other shapes compiles, and it is seen."""
    before = len(COMPILES)
    config = EngineConfig(max_batch_tokens=192, max_item_tokens=8, max_query_tokens=64)
    eng = ScoringEngine(ckpts["qwen3"], config)
    eng.score(
        _random_chunks(np.random.default_rng(1), {"max_query_tokens": 20, "max_item_tokens": 8}, 2)
    )
    assert len(COMPILES) > before and eng.stats()["compiles"] > 0
