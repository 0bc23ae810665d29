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

from mis_kernels.block_attention import BlockMeta, block_attention_reference, ranges_array
from mis_kernels.ragged_attention import ROWS, heads_per_program, ragged_block_attention
from tests.test_block_attention import random_case

NATIVE = jax.default_backend() in ("gpu", "tpu")


def _diff(backend: str, seed: int, interpret: bool, tile=None, rows=ROWS, g=2) -> float:
    q, k, v, pk, pv, meta = random_case(seed, g=g)
    with jax.default_matmul_precision("highest"):
        ref = block_attention_reference(q, k, v, pk, pv, meta, block=16)
        out = ragged_block_attention(
            q,
            k,
            v,
            pk,
            pv,
            meta,
            block=16,
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
    """Isolation inside the kernel: in the block where a query run ends and its items begin,
    the query's last tokens and the first item give the same bits whatever the next item holds
    and however long it is (where the block's stream range is cut follows from its rows)."""
    rng = np.random.default_rng(5)
    block, nb, q_len = 16, 4, 37  # the query run: blocks 0-1 and 5 tokens of block 2
    first = slice(2 * block, 2 * block + 9)  # its last 5 tokens, then a 4-token item

    def run(other_len: int, seed: int) -> np.ndarray:
        data = np.random.default_rng(seed)
        t = nb * block
        q = data.standard_normal((t, 2, 2, 32)).astype(np.float32)
        k = data.standard_normal((t, 2, 32)).astype(np.float32)
        v = data.standard_normal((t, 2, 32)).astype(np.float32)
        for x, fixed in zip((q, k, v), base_rows, strict=True):
            x[: first.stop] = fixed
        local = np.zeros(t, np.int32)
        local[first.start + 5 : first.stop] = 5
        local[first.stop : first.stop + other_len] = 9
        local[first.stop + other_len : 3 * block] = 9 + other_len  # padding
        run_range = (0, 0, 0, q_len)
        ranges = ranges_array([run_range] * 3 + [(0, 0, 0, 0)])
        pool = np.zeros((2, 64, 32), np.float32)
        out = ragged_block_attention(
            q,
            k,
            v,
            pool,
            pool,
            BlockMeta(ranges, local),
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
    meta = random_case(0, block=block, nb=t // block).__getitem__(-1)
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
