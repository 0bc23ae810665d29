"""A replica spanning two hosts: two processes joined by jax.distributed over loopback (CPU
collectives through gloo), each holding 2 of the 4 devices of one tensor-parallel program.

Scores must equal a one-process, one-device engine on the same checkpoint, and with LoRA adapters
(one served from the start, one added and one removed while it runs) transformers + peft.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.inputs import Chunk, EngineBroken, UnknownAdapter
from tests.conftest import LABELS, TEST_ENGINE, random_request, serve_cluster
from tests.hf_families import peft_scores, write_adapter

pytestmark = pytest.mark.ray  # starts Ray: scheduled first (conftest)

# Each host process sees 2 simulated devices (the test process itself has 4).
HOST_ENV = {"env_vars": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}}


def _chunks(adapters=(None, None)) -> list[Chunk]:
    out = []
    for seed, soft, adapter in zip((70, 71), (True, False), adapters, strict=True):
        query, items = random_request(seed=seed, n_items=11, q_len=40, max_item=20)
        out.append(
            Chunk(tuple(query), tuple(map(tuple, items)), tuple(LABELS), soft, adapter=adapter)
        )
    return out


@pytest.fixture(scope="module")
def adapters(ckpts, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_adapter(ckpts["qwen3"], root / name, seed=s) for name, s in (("a", 5), ("b", 6))
    }


@pytest.fixture(scope="module")
def ray_session():
    """The session's Ray cluster (tests/conftest.py)."""
    serve_cluster()
    import ray

    return ray


@pytest.mark.parametrize("mode", ["prefix", "packed"])
def test_two_host_slice_equals_one_process(ray_session, ckpts, engine, adapters, record, mode):
    from ray.util.placement_group import placement_group, remove_placement_group

    from models.engine import EngineConfig
    from serve_app.slice import SliceEngine

    # Adapters in prefix mode only (their programs are compiled on both hosts: ~30 s a mode).
    lora = mode == "prefix"
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray_session.get(pg.ready(), timeout=60)
    try:
        sliced = SliceEngine(
            ckpts["qwen3"],
            EngineConfig(**TEST_ENGINE, mode=mode, tp_size=4, max_adapters=int(lora)),
            num_hosts=2,
            host_options={"num_cpus": 0.5, "runtime_env": HOST_ENV},
            timeout_s=120,
            placement_group=pg,
            adapters={"a": adapters["a"]} if lora else None,
        )
        assert [(h["rank"], h["local_devices"], h["devices"]) for h in sliced.host_info] == [
            (0, 2, 4),
            (1, 2, 4),
        ]
        chunks = _chunks()
        got = sliced.score(chunks)
        want = engine("qwen3", mode).score(chunks)
        for g, w, c in zip(got, want, chunks, strict=True):
            if c.apply_softmax:
                what, diff, bound = "softmax", np.abs(g - w).max(), 1e-5
            else:  # relative, as in test_tensor_parallel
                what, bound = "log-prob relative", 1e-6
                diff = (np.abs(np.log(g) - np.log(w)) / np.abs(np.log(w))).max()
            record(f"2-process tp=4 slice vs 1 process, {what}, {mode}", diff)
            assert diff <= bound
        assert sliced.stats()["items"] == sum(len(c.items) for c in chunks)
        if not lora:
            # A host that dies: the other may be blocked in the forward's collectives, so the
            # slice raises EngineBroken (its replica is replaced) and sends nothing again.
            ray_session.kill(sliced.hosts[1])
            for _ in range(2):
                with pytest.raises(EngineBroken, match="a slice host failed a forward"):
                    sliced.score(chunks)
            return
        # Adapters: "a" served from the start, "b" added now; one device slot, so the call
        # below loads each in turn on both hosts. Then "a" removed.
        sliced.register_adapter("b", sliced.check_adapter(adapters["b"]))
        for names in (("a", "b"), ("b", "a")):
            chunks = _chunks(names)
            got_all = sliced.score(chunks[:1]) + sliced.score(chunks[1:])
            for got, c in zip(got_all, chunks, strict=True):
                soft, logp = peft_scores(
                    ckpts["qwen3"], adapters[c.adapter], c.query, c.items, LABELS
                )
                if c.apply_softmax:  # the parity bounds (tests/test_lora.py)
                    np.testing.assert_allclose(got, soft, atol=1e-4, err_msg=c.adapter)
                else:
                    np.testing.assert_allclose(np.log(got), logp, atol=1e-3, err_msg=c.adapter)
        sliced.remove_adapter("a")
        got = sliced.score(_chunks(("b", "a")))
        assert isinstance(got[1], UnknownAdapter) and "'a'" in str(got[1])
        assert not isinstance(got[0], Exception)
        with pytest.raises(ValueError, match="adapter_config.json") as refused:
            sliced.check_adapter(ckpts["qwen3"])  # no adapter there: every host refuses it
        assert "Traceback" not in str(refused.value)  # the host's error, not its traceback
        deadline = time.monotonic() + 60
        while any(ray_session.get([h.checked.remote() for h in sliced.hosts])):
            assert time.monotonic() < deadline, "a refused read is still held by a host"
            time.sleep(0.1)
        # A host that fails a change (host 1 told to serve a read it never made) breaks the
        # slice for good: no engine call is sent to its hosts again.
        sliced._send_change([sliced.hosts[1].register_adapter.remote("z", -1)])
        broken = r"failed to change its adapters: RayTaskError\(KeyError\)"
        for _ in range(2):
            with pytest.raises(EngineBroken, match=broken):
                sliced.score(_chunks())
    finally:
        remove_placement_group(pg)  # its host actors go with it


def test_no_placement_group_is_a_clear_error(ray_session, ckpts):
    from models.engine import EngineConfig
    from serve_app.slice import SliceEngine

    with pytest.raises(ValueError, match="placement_group_bundles"):
        SliceEngine(ckpts["qwen3"], EngineConfig(tp_size=4), 2, {}, 10)
