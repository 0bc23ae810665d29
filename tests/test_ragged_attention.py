"""The Pallas ragged segment-attention kernels against their XLA reference.

On CPU the TPU kernel runs under `pltpu.force_tpu_interpret_mode()` and the GPU kernel in
Pallas' interpreter; both are also lowered for TPU (Mosaic) and CUDA (Triton) without hardware,
and run natively where such a device is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from kernels.ragged_attention import (
    packed_meta,
    ragged_attention,
    ragged_attention_reference,
    tile_schedule,
)
from tests.conftest import LABELS, random_request

# (sequences packed back to back as (query_len, item lengths), q heads, kv heads, prefix keys
# prepended, tile). Query and stream lengths are not multiples of the tile.
CASES = {
    "one-query-64-items": ([(37, list(np.random.default_rng(0).integers(1, 41, 64)))], 2, 1, 0, 64),
    "three-chunks": ([(1, [1]), (50, [3, 40, 1, 7, 22]), (129, [17] * 9)], 2, 1, 0, 32),
    "gqa-4q-2kv": ([(45, [5, 1, 40, 12, 33])], 4, 2, 0, 32),
    "cached-prefix": ([(0, [1, 9, 40, 2, 28, 11])], 2, 1, 77, 32),
}


def make_case(name: str, seed: int = 0):
    seqs, hq, hk, prefix, tile = CASES[name]
    meta = packed_meta(seqs)
    if prefix:  # items of a stream whose query (prefix keys 0..prefix-1) is cached
        meta[:, 1] = prefix
        meta[:, 2] += prefix
    t, d = len(meta), 64
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (1, hq, t, d), jnp.float32)
    k = jax.random.normal(kk, (1, hk, prefix + t, d), jnp.float32)
    v = jax.random.normal(kv, (1, hk, prefix + t, d), jnp.float32)
    return q, k, v, jnp.asarray(meta)[None], prefix, tile


def test_packed_meta_mask_by_hand():
    # query of 2, items of 2 and 1 tokens, then a second sequence: query 1, item 1.
    meta = packed_meta([(2, [2, 1]), (1, [1])])
    q = jnp.zeros((1, 1, 7, 8))
    k = jnp.zeros((1, 1, 7, 8))
    # v = one-hot of the key index, so the output row is the attention distribution.
    v = jnp.eye(7, 8)[None, None]
    probs = np.asarray(ragged_attention_reference(q, k, v, jnp.asarray(meta)[None]))[0, 0, :, :7]
    expected = np.array(
        [
            # q0 q1 A0 A1 B0 | r0 s0
            [1, 0, 0, 0, 0, 0, 0],  # q0
            [1, 1, 0, 0, 0, 0, 0],  # q1
            [1, 1, 1, 0, 0, 0, 0],  # A0
            [1, 1, 1, 1, 0, 0, 0],  # A1
            [1, 1, 0, 0, 1, 0, 0],  # B0: never item A
            [0, 0, 0, 0, 0, 1, 0],  # r0: the second sequence's query, nothing of the first
            [0, 0, 0, 0, 0, 1, 1],  # s0
        ],
        bool,
    )
    np.testing.assert_array_equal(probs > 0, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_kernel_matches_reference(name, record):
    q, k, v, meta, prefix, tile = make_case(name)
    ref = ragged_attention_reference(q, k, v, meta, kv_offset=prefix)
    with pltpu.force_tpu_interpret_mode():
        out = ragged_attention(q, k, v, meta, kv_offset=prefix, block_q=tile, block_k=tile)
    diff = float(jnp.abs(out - ref).max())
    record("pallas TPU kernel (interpret) vs XLA reference", diff)
    assert diff <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_kernel_matches_reference(name, record):
    q, k, v, meta, prefix, tile = make_case(name)
    ref = ragged_attention_reference(q, k, v, meta, kv_offset=prefix)
    out = ragged_attention(
        q, k, v, meta, kv_offset=prefix, block_q=tile, block_k=tile, backend="gpu", interpret=True
    )
    diff = float(jnp.abs(out - ref).max())
    record("pallas GPU kernel (interpret) vs XLA reference", diff)
    assert diff <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_covers_every_visible_key_and_skips(name):
    """Every visible (token, key) pair lies in a visited tile, and ruled-out tiles are skipped:
    visited work stays within a few tiles of the O(T x (query + item)) pairs."""
    q, k, v, meta, prefix, tile = make_case(name)
    t, s = q.shape[2], k.shape[2]
    nq, nk = -(-t // tile), -(-s // tile)
    pad = np.arange(nq * tile)[:, None] + prefix + 1
    m = np.where(
        np.arange(nq * tile)[:, None] < t, np.pad(meta[0], ((0, nq * tile - t), (0, 0))), pad
    )
    counts, order = tile_schedule(
        jnp.asarray(m)[None], kv_offset=prefix, block_q=tile, block_k=tile, num_k_tiles=nk
    )
    counts, order = np.asarray(counts[0]), np.asarray(order[0])
    visited = np.zeros((nq, nk), bool)
    for i in range(nq):
        visited[i, order[i, : counts[i]]] = True
    # The visible pairs, from the reference's mask: attention to one-hot values.
    probs = ragged_attention_reference(
        jnp.zeros((1, 1, t, s)),
        jnp.zeros((1, 1, s, s)),
        jnp.eye(s)[None, None],
        meta,
        kv_offset=prefix,
    )
    vis = np.asarray(probs[0, 0]) > 0
    ti, ui = np.nonzero(vis)
    assert visited[ti // tile, ui // tile].all()
    if name == "one-query-64-items":
        assert visited.sum() < 0.4 * nq * nk  # ~1300 tokens, 37 of query, items <= 40
    pairs_in_visited = visited.sum() * tile * tile
    assert pairs_in_visited <= 4 * vis.sum() + 2 * nq * tile * tile


def test_kernels_lower_for_tpu_and_cuda():
    """Mosaic (TPU) and Triton (CUDA) lowering succeeds without the hardware, at the
    engine's tile sizes and a bf16 head_dim 128 GQA shape."""
    from jax._src.pallas.mosaic import tpu_info  # lowering asks for the TPU generation

    tpu_info.registry.setdefault(
        jax.devices()[0].device_kind,
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    meta = jnp.asarray(packed_meta([(300, [20] * 40)]))[None]
    t = meta.shape[1]
    q = jnp.zeros((1, 8, t, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, t, 128), jnp.bfloat16)
    for platform, backend, tile, target in [
        ("tpu", "tpu", 128, "tpu_custom_call"),
        ("cuda", "gpu", 64, "xla.gpu.triton"),
    ]:
        fn = jax.jit(
            lambda q, k, v, m, backend=backend, tile=tile: ragged_attention(
                q, k, v, m, backend=backend, block_q=tile, block_k=tile
            )
        )
        lowered = export.export(
            fn,
            platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, k, k, meta)
        assert target in lowered.mlir_module()


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_native_kernel_matches_reference(name):
    q, k, v, meta, prefix, tile = make_case(name)
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    tile = 128 if backend == "tpu" else tile
    ref = ragged_attention_reference(q, k, v, meta, kv_offset=prefix)
    out = ragged_attention(
        q, k, v, meta, kv_offset=prefix, block_q=tile, block_k=tile, backend=backend
    )
    assert float(jnp.abs(out - ref).max()) <= 1e-5


@pytest.mark.parametrize("mode", ["serial", "packed", "prefix"])
def test_engine_with_pallas_equals_serial(engine, record, mode):
    """`attention_impl: pallas` through the whole model: same scores as XLA serial scoring."""
    query, items = random_request(seed=40, n_items=11, q_len=45)
    ref = engine("qwen3", "serial").score_ids(query, items, LABELS, apply_softmax=True)
    got = engine("qwen3", mode, "segment", impl="pallas").score_ids(
        query, items, LABELS, apply_softmax=True
    )
    record(f"pallas engine {mode} vs XLA serial, softmax", np.abs(got - ref).max())
    assert np.abs(got - ref).max() <= 1e-5
