"""After warm-up nothing compiles, whatever the mix of requests within the engine's limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from models.engine import EngineConfig, ScoringEngine, staggered
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


_CACHED_WARMUP = """
import json, sys
from pathlib import Path
import jax
from models.engine import EngineConfig, ScoringEngine, use_compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **_: hits.append(1) if name == "/jax/compilation_cache/cache_hits" else None
)
use_compilation_cache(Path(sys.argv[2]))
config = EngineConfig(max_batch_tokens=128, max_item_tokens=8, max_query_tokens=32, max_labels=2)
report = ScoringEngine(sys.argv[1], config).warmup((int(sys.argv[3]), int(sys.argv[4])))
print(json.dumps({"shapes": report["shapes"], "cache_hits": len(hits)}))
"""


def test_a_restarted_engine_loads_its_programs_from_the_compilation_cache(ckpts, tmp_path):
    """What a Scorer replica does at start (use_compilation_cache): the first process compiles
    and stores every warm-up program, a second one with the same settings loads them all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own cache would win otherwise
    cache = tmp_path / "jax"

    def warm_start(part: tuple[int, int]) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _CACHED_WARMUP, ckpts["qwen3"], str(cache), *map(str, part)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = warm_start((0, 1))
    assert first["shapes"] > 0 and first["cache_hits"] == 0
    assert any(cache.iterdir())
    # The second of two replicas (staggered order): the same programs, every one loaded.
    second = warm_start((1, 2))
    assert second["cache_hits"] >= second["shapes"] == first["shapes"]


def test_a_body_program_traces_each_layer_once(ckpts, monkeypatch):
    """Building a body program traces the layer (its attention) once, not once more for
    nn.scan's search for broadcast outputs: tracing is most of what a replica's warm-up costs
    when its programs come from the compilation cache."""
    import models.decoder
    import models.engine

    traced = []
    attend = models.decoder.block_attention
    monkeypatch.setattr(
        models.decoder, "block_attention", lambda *a, **k: traced.append(1) or attend(*a, **k)
    )
    config = EngineConfig(max_batch_tokens=192, max_item_tokens=8, max_query_tokens=32)
    engine = ScoringEngine(ckpts["qwen3"], config)
    monkeypatch.setattr(models.engine, "_PROGRAMS", {})  # built here, not taken from another test
    traced.clear()  # the parameters' shapes (nn.scan's init) are not a body's
    engine._body(192)
    assert len(traced) == 1


def test_staggered_warmup_orders():
    """Replicas starting together each begin at their share of the compile cost, every order
    a rotation over all the shapes."""
    costs = [4.0] * 7 + [1.0] * 4  # 7 bodies, 4 LM heads
    assert staggered(costs, 0, 1) == list(range(11))
    first, second = staggered(costs, 0, 2), staggered(costs, 1, 2)
    assert second == [4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3]  # bodies 4-6 + heads: 16 of 32
    assert first == list(range(11)) and staggered(costs, 3, 2) == second  # rank mod count
    for n in (1, 2, 3, 8, 16):
        for i in range(n):
            order = staggered(costs, i, n)
            assert order == [*range(order[0], 11), *range(order[0])]  # a rotation
    assert staggered([], 0, 2) == [] and staggered([1.0], 1, 4) == [0]


def test_a_forward_deadline_does_not_count_compiles(ckpts, monkeypatch):
    """A Scorer with warm-up off compiles on first use: a compile slower than
    forward_timeout_s is not a hung forward (the deadline counts the forward's time less the
    engine's compile_seconds), and a forward slow without compiling still is one."""
    import asyncio
    import time

    from serve_app.config import AppArgs
    from serve_app.scorer import Scorer, _Hung

    config = EngineConfig(
        mode="packed", max_labels=7, max_batch_tokens=768, max_item_tokens=8, max_query_tokens=64
    )
    eng = ScoringEngine(ckpts["qwen3"], config)  # shapes no other engine of this process has
    compile_program = eng._compile

    def slow_compile(*args, **kwargs):  # what a big model's first compile on a TPU looks like
        time.sleep(1.5)
        return compile_program(*args, **kwargs)

    monkeypatch.setattr(eng, "_compile", slow_compile)
    scorer = object.__new__(Scorer.func_or_class)  # the replica's deadline logic, no Serve
    scorer.args = AppArgs.parse({"limits.forward_timeout_s": 1.0}).scorer_args()
    scorer.engine, scorer._busy_since = eng, None
    scorer._record_stats = lambda stats: None  # Ray metrics: not here
    chunk = Chunk((5, 6, 7), ((8, 9), (10,)), (1, 2, 3))
    (scores,) = asyncio.run(scorer._forward_in_time([chunk]))  # a body and a head: 3 s
    assert eng.stats()["compiles"] == 2 and eng.compile_seconds() >= 3.0
    np.testing.assert_array_equal(scores, eng.score([chunk])[0])
    assert scorer._busy_s() == 0.0
    monkeypatch.setattr(scorer, "_forward", lambda chunks: time.sleep(2.0))
    with pytest.raises(_Hung, match="forward_timeout_s=1.0"):
        asyncio.run(scorer._forward_in_time([chunk]))
