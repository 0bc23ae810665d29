"""The Pallas block-attention kernel (kernels/ragged_attention.py) against its reference.

On CPU the TPU kernel runs in TPU interpret mode and the GPU kernel in Pallas' interpreter; both
are also lowered for TPU (Mosaic) and CUDA (Triton) without hardware, and run natively where
such a device is present. Float32 comparisons pin the matmul precision: GPUs default to TF32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels.block_attention import block_attention_reference
from kernels.ragged_attention import ragged_block_attention
from tests.test_block_attention import random_case

NATIVE = jax.default_backend() in ("gpu", "tpu")


def _diff(backend: str, seed: int, interpret: bool, tile: int | None = None) -> float:
    q, k, v, pk, pv, meta = random_case(seed)
    with jax.default_matmul_precision("highest"):
        ref = block_attention_reference(q, k, v, pk, pv, meta, block=16)
        out = ragged_block_attention(
            q, k, v, pk, pv, meta, block=16, tile=tile, backend=backend, interpret=interpret
        )
    return float(jnp.abs(out - ref).max())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_matches_reference_in_interpret_mode(backend, seed, record):
    diff = _diff(backend, seed, interpret=True, tile=8 if seed else None)
    record(f"pallas {backend.upper()} kernel (interpret) vs reference", diff)
    assert diff <= 1e-5


def test_kernels_lower_for_tpu_and_cuda():
    """Mosaic (TPU) and Triton (CUDA) lowering succeeds without the hardware, at a bf16
    head_dim 128 GQA shape and the engine's block size."""
    from jax._src.pallas.mosaic import tpu_info  # lowering asks for the TPU generation

    tpu_info.registry.setdefault(
        jax.devices()[0].device_kind,
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    t, block = 512, 128
    q = jnp.zeros((t, 2, 4, 128), jnp.bfloat16)
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
