"""Tensor parallelism inside one replica: a 1-D device mesh ("tp") over the replica's devices.

Megatron-style split: q/k/v projections by heads and gate/up by MLP columns (column parallel),
o_proj and down_proj by their input rows (row parallel: XLA adds one all-reduce after each).
Attention runs under `shard_map` on each device's heads, so the segment kernels see plain local
arrays. Embedding, norms and the LM head stay replicated. When a model has fewer KV heads than
devices, each KV head is repeated so every device holds the one its query heads read (vLLM
does the same); the scores are unchanged because a repeated head is the same head.

The same code spans hosts: in a `jax.distributed` run the mesh holds every process's devices
and each process feeds identical host inputs (see serve_app/slice.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig, check_tp_size

AXIS = "tp"

# Sharded axis of each parameter, counted from the end so it holds with or without the
# leading layer axis of the scanned stack; parameters not listed are replicated.
#   q/k/v kernel [layers, hidden, heads, head_dim], bias [layers, heads, head_dim]
#   o_proj kernel [layers, heads, head_dim, hidden]
#   gate/up kernel [layers, hidden, mlp], down kernel [layers, mlp, hidden]
SHARDED_AXIS: dict[tuple[str, str], int] = {
    ("q_proj", "kernel"): -2,
    ("q_proj", "bias"): -2,
    ("k_proj", "kernel"): -2,
    ("k_proj", "bias"): -2,
    ("v_proj", "kernel"): -2,
    ("v_proj", "bias"): -2,
    ("o_proj", "kernel"): -3,
    ("gate_proj", "kernel"): -1,
    ("up_proj", "kernel"): -1,
    ("down_proj", "kernel"): -2,
}
# Stream activations carry heads on axis 1 ([T, heads, ...]); the KV pool of one layer on
# axis 0 ([kv_heads, tokens, head_dim]); the layer-stacked pool on axis 1.
HEAD_AXIS = 1


def tp_config(cfg: ModelConfig, tp_size: int) -> ModelConfig:
    """The model as the devices run it: KV heads repeated up to `tp_size` when fewer."""
    check_tp_size(cfg, tp_size)
    if cfg.num_kv_heads >= tp_size:
        return cfg
    return dataclasses.replace(cfg, num_kv_heads=tp_size)


def tp_mesh(tp_size: int) -> Mesh:
    """A mesh over the first `tp_size` devices; in a multi-process run it must span them all,
    since every process runs the same program."""
    devices = jax.devices()
    if tp_size > len(devices):
        raise ValueError(
            f"tp_size {tp_size} needs {tp_size} devices; this process sees {len(devices)} "
            f"({devices[0].platform}). On CPU, XLA_FLAGS="
            f"--xla_force_host_platform_device_count={tp_size} simulates them."
        )
    if jax.process_count() > 1 and tp_size != len(devices):
        raise ValueError(
            f"tp_size {tp_size} must equal the {len(devices)} devices of this "
            f"{jax.process_count()}-process run (one replica spans every host of the slice)"
        )
    return Mesh(np.array(devices[:tp_size]), (AXIS,))


def _param_spec(path: tuple[Any, ...], ndim: int) -> P:
    names = [getattr(k, "key", str(k)) for k in path]
    axis = SHARDED_AXIS.get((names[-2], names[-1])) if len(names) >= 2 else None
    if axis is None:
        return P()
    spec: list[str | None] = [None] * ndim
    spec[axis] = AXIS
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding per parameter, from SHARDED_AXIS."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _param_spec(path, x.ndim)), params
    )


def shard_params(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """Place host parameters of `cfg` on `mesh` (KV heads repeated as `tp_config` says).

    Built shard by shard from host arrays, which is what a multi-process run needs: each
    process supplies only the shards of its own devices.
    """
    repeat = tp_config(cfg, mesh.size).num_kv_heads // cfg.num_kv_heads

    def place(path, x, sharding):
        host = np.asarray(x)
        names = [getattr(k, "key", str(k)) for k in path]
        key = tuple(names[-2:])
        if repeat > 1 and key[0] in ("k_proj", "v_proj"):
            host = np.repeat(host, repeat, axis=host.ndim + SHARDED_AXIS[key])
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map_with_path(place, params, param_shardings(params, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    """The KV pool [layers, kv_heads, tokens, head_dim]: split by KV head, like the projections
    that fill it (no gather between a prefill and the forwards that read it)."""
    return NamedSharding(mesh, P(None, AXIS))


def over_heads(
    fn: Callable[[dict[str, jax.Array]], jax.Array], mesh: Mesh | None, heads: dict[str, int]
):
    """`fn(arrays) -> out [T, heads, ...]` run on each device's heads under `shard_map`: the
    arrays named in `heads` are split on the axis given there, the others (metadata) are
    replicated. With no mesh, `fn` itself."""
    if mesh is None:
        return fn

    def spec(name: str, x: jax.Array) -> P:
        if name not in heads:
            return P()
        axes: list[str | None] = [None] * x.ndim
        axes[heads[name]] = AXIS
        return P(*axes)

    def run(arrays: dict[str, jax.Array]) -> jax.Array:
        specs = {name: spec(name, x) for name, x in arrays.items()}
        out_spec = P(*([None] * HEAD_AXIS), AXIS)
        # check_vma off: the Pallas kernel's outputs carry no varying-axes annotation.
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=(specs,), out_specs=out_spec, check_vma=False
        )
        return mapped(arrays)

    return run


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated result as numpy, also when other processes hold some of its devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))
