"""The Pallas block-attention kernel (mis_kernels/ragged_attention.py) against its reference.

On CPU the TPU kernel runs in TPU interpret mode and the GPU kernel in Pallas' interpreter; both
are also lowered for TPU (Mosaic) and CUDA (Triton) without hardware, and run natively where
such a device is present. Float32 comparisons pin the matmul precision: GPUs default to TF32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mis_kernels.block_attention import (
    BlockMeta,
    block_attention_reference,
    own_array,
    prefix_array,
)
from mis_kernels.layout import POOL, STREAM, TAKES_ALL, TAKES_NONE
from mis_kernels.ragged_attention import ROWS, heads_per_program, ragged_block_attention
from tests.test_block_attention import random_case

NATIVE = jax.default_backend() in ("gpu", "tpu")


def _diff(backend: str, seed: int, interpret: bool, tile=None, rows=ROWS, g=2) -> float:
    c = random_case(seed, g=g)
    with jax.default_matmul_precision("highest"):
        ref = block_attention_reference(*c.arrays, block=c.block)
        out = ragged_block_attention(
            *c.arrays,
            block=c.block,
            tile=tile,
            rows=rows,
            backend=backend,
            interpret=interpret,
        )
    return float(jnp.abs(out - ref).max())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_matches_reference_in_interpret_mode(backend, seed, record):
    # Seed 0: both query heads of a kv head in one program, key tiles of the block's size;
    # seeds 1-2: one head per program (rows=16), key tiles smaller / larger than the block;
    # seed 3: 4 query heads per kv head, 2 per program.
    tile, rows, g = [(None, ROWS, 2), (8, 16, 2), (32, 16, 2), (None, 32, 4)][seed]
    diff = _diff(backend, seed, interpret=True, tile=tile, rows=rows, g=g)
    record(f"pallas {backend.upper()} kernel (interpret) vs reference", diff)
    assert diff <= 1e-5


def test_heads_per_program():
    assert heads_per_program(group=2, block=64, rows=128) == 2
    assert heads_per_program(group=4, block=32, rows=128) == 4
    assert heads_per_program(group=8, block=64, rows=128) == 2
    assert heads_per_program(group=2, block=128, rows=128) == 1
    assert heads_per_program(group=5, block=16, rows=128) == 1  # 5 heads: no power of two
    assert heads_per_program(group=6, block=16, rows=128) == 2


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_a_row_does_not_depend_on_the_rest_of_its_block(backend):
    """Isolation inside the kernel: in the last block of a long item, where other items of its
    query follow it, the long item's last tokens and the first item after it give the same
    bits whatever the next item holds and however long it is (the own range is masked for the
    later items' rows, never cut for the long item's)."""
    rng = np.random.default_rng(5)
    block, nb, q_len = 16, 4, 37  # a query run in blocks 0-2, a 21-token item in blocks 3-4
    first = slice(4 * block, 4 * block + 9)  # the item's last 5 tokens, then a 4-token item

    def run(other_len: int, seed: int) -> np.ndarray:
        data = np.random.default_rng(seed)
        t = (nb + 2) * block
        q = data.standard_normal((t, 2, 2, 32)).astype(np.float32)
        k = data.standard_normal((t, 2, 32)).astype(np.float32)
        v = data.standard_normal((t, 2, 32)).astype(np.float32)
        for x, fixed in zip((q, k, v), base_rows, strict=True):
            x[: first.stop] = fixed
        local = np.zeros(t, np.int32)
        local[first.start + 5 : first.stop] = 5
        local[first.stop : first.stop + other_len] = 9
        local[first.stop + other_len : 5 * block] = 9 + other_len  # padding
        # the query run (each block sees the run's earlier blocks), the item's two blocks (the
        # second sees the item's first 16 tokens: its own range), padding
        own = [(TAKES_NONE, 0, i * block, 0) for i in range(3)]
        own += [(TAKES_ALL, 3 * block, 0, q_len), (TAKES_ALL, 3 * block, block, q_len)]
        own += [(TAKES_NONE, 0, 0, 0)]
        prefix = [(POOL, 0, 0)] * 3 + [(STREAM, 0, q_len)] * 2 + [(POOL, 0, 0)]
        meta = BlockMeta(prefix_array(prefix), own_array(own), local)
        pool = np.zeros((2, 64, 32), np.float32)
        out = ragged_block_attention(
            q,
            k,
            v,
            pool,
            pool,
            meta,
            block=block,
            tile=8,
            backend=backend,
            interpret=True,
        )
        return np.asarray(out)[first]

    base_rows = [
        rng.standard_normal((first.stop, *shape)).astype(np.float32)
        for shape in ((2, 2, 32), (2, 32), (2, 32))
    ]
    want = run(7, 0)
    for other_len, seed in ((7, 1), (2, 2), (0, 3)):
        np.testing.assert_array_equal(run(other_len, seed), want)


@pytest.mark.parametrize("block", [64, 128])
def test_kernels_lower_for_tpu_and_cuda(block):
    """Mosaic (TPU) and Triton (CUDA) lowering succeeds without the hardware, at the engine's
    block sizes with a bf16 head_dim 128 GQA shape (group 2: block 64 stacks both query heads
    of a kv head in one program, block 128 runs one per program)."""
    from jax._src.pallas.mosaic import tpu_info  # lowering asks for the TPU generation

    tpu_info.registry.setdefault(
        jax.devices()[0].device_kind,
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    t = 512
    q = jnp.zeros((t, 2, 2, 128), jnp.bfloat16)
    k = jnp.zeros((t, 2, 128), jnp.bfloat16)
    pool = jnp.zeros((2, 1024, 128), jnp.bfloat16)
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    meta = BlockMeta(zeros(t // block, 3), zeros(t // block, 4), zeros(t))
    for platform, backend, target in [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")]:
        fn = jax.jit(
            lambda q, k, v, pk, pv, m, backend=backend: ragged_block_attention(
                q, k, v, pk, pv, m, block=block, backend=backend, interpret=False
            )
        )
        lowered = export.export(
            fn,
            platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, k, k, pool, pool, meta)
        assert target in lowered.mlir_module()


@pytest.mark.skipif(not NATIVE, reason="needs a GPU or TPU")
@pytest.mark.parametrize("seed", range(3))
def test_native_kernel_matches_reference(seed, record):
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    diff = _diff(backend, seed, interpret=False)
    record(f"pallas {backend.upper()} kernel (native) vs reference", diff)
    assert diff <= 1e-5
