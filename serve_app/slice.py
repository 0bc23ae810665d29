"""One scorer replica over every host of a multi-host slice (e.g. a TPU v6e-16: 4 hosts).

JAX runs one program per host (multi-controller SPMD): each host is a Ray actor that joins a
`jax.distributed` group and builds the same tensor-parallel engine over the slice's devices.
The Serve replica that owns them sends every batch of chunks to all hosts, in the same order,
and returns host 0's answer (the scores are replicated on every host). LoRA adapters too: every
host reads an adapter's files itself (the directory, like the checkpoint's, must be on every
host), and joins or drops it between the same two engine calls as the others.

Placement, one placement group per replica, so autoscaling adds or removes whole slices:
- TPU (`tpu_topology` set): the replica reserves a slice with `ray.util.tpu.slice_placement_group`,
  which pins every bundle to the hosts of one slice (by the `ray.io/tpu-slice-name` label; plain
  STRICT_SPREAD bundles could mix hosts of two slices once there are several);
- otherwise: the Scorer deployment's own `placement_group_bundles`, one per host.
The group lives as long as the replica that made or was given it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from models.adapters import LoraAdapter
from models.engine import EngineConfig, ScoringEngine
from models.inputs import Chunk, EngineBroken, ScoringInputError

log = logging.getLogger("ray.serve")


@ray.remote(concurrency_groups={"read": 1})
class SliceHost:
    """One host's process of the slice: its `jax.distributed` rank and its engine. Adapter
    reads run in a thread of their own (concurrency group "read"), beside the forwards, as a
    one-host replica reads them: a large adapter on slow storage does not stall scoring."""

    def coordinator_address(self) -> str:
        """A free port on this host for the `jax.distributed` coordinator (rank 0 only)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(
        self,
        coordinator: str,
        num_hosts: int,
        rank: int,
        model_path: str,
        config: EngineConfig,
        adapters: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        import jax

        # CPU hosts (tests, and the CPU proof of the recipe) need a cross-process collective
        # backend; accelerators bring their own and ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_hosts, process_id=rank)
        self.engine = ScoringEngine(model_path, config, adapters)
        self._checked: dict[int, LoraAdapter] = {}  # read, not yet served (by token)
        return {
            "rank": rank,
            "node": ray.get_runtime_context().get_node_id(),
            "local_devices": jax.local_device_count(),
            "devices": jax.device_count(),
        }

    def score(self, chunks: Sequence[Chunk]) -> list:
        return self.engine.score(chunks)

    def warmup(self, part: tuple[int, int] = (0, 1)) -> dict[str, float]:
        return self.engine.warmup(part)

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    @ray.method(concurrency_group="read")
    def check_adapter(self, token: int, path: str, digest: str | None) -> None:
        self._checked[token] = self.engine.check_adapter(path, digest)  # read-only: any thread

    @ray.method(concurrency_group="read")
    def forget_checked(self, token: int) -> None:
        self._checked.pop(token, None)

    def checked(self) -> list[int]:
        return list(self._checked)

    def register_adapter(self, name: str, token: int) -> None:
        self.engine.register_adapter(name, self._checked.pop(token))

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)


@dataclasses.dataclass(frozen=True)
class CheckedOnHosts:
    """An adapter every host of a slice has read and checked (SliceEngine.check_adapter); each
    holds its copy under `token` until it is registered."""

    token: int


def reserve_tpu_slice(
    topology: str, version: str, num_hosts: int, host_options: dict[str, Any]
) -> Any:
    """Ray's handle on one free TPU slice (waits until there is one): its placement group
    has a bundle per host sized for one SliceHost actor, and its head reservation (the
    slice's TPU-...-head resource) keeps other replicas off the slice while it is held."""
    from ray.util.tpu import slice_placement_group

    chips = host_options.get("resources", {}).get("TPU")
    if not chips:
        raise ValueError('tpu_topology needs host_resources with the chips per host: {"TPU": 4}')
    bundle = {**host_options["resources"], "CPU": host_options.get("num_cpus", 0)}
    handle = slice_placement_group(
        topology, version, chips_per_vm=int(chips), resources_per_bundle=bundle
    )
    if handle.num_hosts != num_hosts:
        raise ValueError(
            f"a {version} {topology} slice of {chips}-chip hosts has {handle.num_hosts} hosts; "
            f"hosts_per_replica is {num_hosts}"
        )
    log.info("waiting for a free %s %s slice (%d hosts)", version, topology, num_hosts)
    ray.get(handle.placement_group.ready())
    return handle


class SliceEngine:
    """The engine interface (models.engine.Engine) run by `num_hosts` SliceHost actors as one
    SPMD program."""

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        num_hosts: int,
        host_options: dict[str, Any],
        timeout_s: float,
        placement_group: PlacementGroup | None = None,
        tpu_slice: tuple[str, str] | None = None,
        name: str | None = None,
        adapters: dict[str, str] | None = None,
    ):
        """`tpu_slice` = (topology, version): reserve one TPU slice for this engine; else
        `placement_group`, else the caller's own (the Serve replica's bundles). Host actors
        are named `{name}:{rank}` when `name` is given (`ray list actors` shows them).
        `adapters`: LoRA adapters served from the start (ScoringEngine's), read by each host."""
        self._tpu_slice = None  # held for the engine's lifetime
        if tpu_slice is not None:
            self._tpu_slice = reserve_tpu_slice(*tpu_slice, num_hosts, host_options)
            placement_group = self._tpu_slice.placement_group
        pg = placement_group or get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < num_hosts:
            found = 0 if pg is None else len(pg.bundle_specs)
            raise ValueError(
                f"hosts_per_replica {num_hosts} needs a placement group of one bundle per host; "
                f"found {found} bundles: set the Scorer deployment's placement_group_bundles"
            )
        self.config = config
        self.timeout_s = timeout_s  # per scoring call; loading and warm-up wait as needed
        self.hosts = [
            SliceHost.options(
                **host_options,
                name=None if name is None else f"{name}:{i}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i
                ),
            ).remote()
            for i in range(num_hosts)
        ]
        (coordinator,) = self._all([self.hosts[0].coordinator_address.remote()])
        self.host_info = self._all(
            [
                h.start.remote(coordinator, num_hosts, rank, str(model_path), config, adapters)
                for rank, h in enumerate(self.hosts)
            ]
        )
        log.info(
            "slice of %d hosts up (coordinator %s): %s", num_hosts, coordinator, self.host_info
        )
        self._tokens = itertools.count()
        # Adapter changes sent to the hosts and not yet seen done: not waited for when sent
        # (the batcher sends them from its event loop), only before the next engine call is.
        self._changes: list[ray.ObjectRef] = []
        self._changes_lock = threading.Lock()
        self._broken: str | None = None

    def _all(self, refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """Every host's answer. Raises as soon as one host fails, and after `timeout_s`: the
        other hosts may be blocked in a collective with it, so the replica must be replaced."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(f"slice hosts did not answer within {timeout_s} s")
            ray.get(done)  # a failed host raises here, not after the others
        return ray.get(refs)

    def score(self, chunks: Sequence[Chunk]) -> list[Any | ScoringInputError]:
        """Bad input comes back as values; an exception is a host that failed or stalled, and
        the others may be blocked in a collective with it: the slice must not score again."""
        self._changes_done()
        refs = [h.score.remote(list(chunks)) for h in self.hosts]
        try:
            return self._all(refs, self.timeout_s)[0]
        except Exception as e:
            self._broken = f"a slice host failed a forward: {type(e).__name__}: {e}"
            raise EngineBroken(self._broken) from e

    def check_adapter(self, path: str, digest: str | None = None) -> CheckedOnHosts:
        """ScoringEngine.check_adapter on every host (each reads the files, beside its
        forwards), within the slice's call timeout; raises what the first host that refused it
        says."""
        checked = CheckedOnHosts(next(self._tokens))
        try:
            self._all(
                [h.check_adapter.remote(checked.token, str(path), digest) for h in self.hosts],
                self.timeout_s,
            )
        except Exception as e:
            for h in self.hosts:
                h.forget_checked.remote(checked.token)
            if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
                raise e.cause from None  # the host's own error, not its remote traceback
            raise
        return checked

    # Adapter changes and engine calls come from one caller at a time (the Scorer's batcher
    # makes changes between engine calls only); the lock guards the list alone.

    def register_adapter(self, name: str, adapter: CheckedOnHosts) -> None:
        """Serve `adapter` as `name` on every host, from their next engine call on."""
        self._send_change([h.register_adapter.remote(name, adapter.token) for h in self.hosts])

    def remove_adapter(self, name: str) -> None:
        self._send_change([h.remove_adapter.remote(name) for h in self.hosts])

    def _send_change(self, refs: list[ray.ObjectRef]) -> None:
        with self._changes_lock:
            self._changes += refs

    def _changes_done(self) -> None:
        """Wait for the adapter changes sent so far, before the next engine call is sent. A
        host that failed one no longer serves the adapters the others do: the slice must not
        score again."""
        with self._changes_lock:
            refs, self._changes = self._changes, []
        try:
            self._all(refs, self.timeout_s)
        except Exception as e:
            self._broken = f"a slice host failed to change its adapters: {type(e).__name__}: {e}"
        if self._broken is not None:
            raise EngineBroken(self._broken)

    def warmup(self, part: tuple[int, int] = (0, 1)) -> dict[str, float]:
        # Every host in the same order: they run one program.
        return self._all([h.warmup.remote(part) for h in self.hosts])[0]

    def stats(self) -> dict[str, int]:
        return self._all([self.hosts[0].stats.remote()], self.timeout_s)[0]

    def compile_seconds(self) -> float:
        """0: a slice always warms up first (AppArgs refuses `warmup: false` for one), so its
        forwards never compile, and its hosts are busy in the forward the deadline watches."""
        return 0.0
