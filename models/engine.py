"""The scoring engine: exact multi-item scoring (DESIGN.md section 1) in three modes, no Ray.

    serial : one causal run per `query ++ item`; the fallback for item_first
    packed : each forward runs the query, then its items against it; nothing is kept
    prefix : the query runs once and its K/V stay in a device pool (LRU); later chunks and
             requests with the same query read them from there

Chunks of any number of requests are packed into forwards over one flat stream of blocks
(models/plan.py). A forward is two compiled programs: the body over T tokens and the LM head
over S score positions, T and S each from a short ladder fixed by the config. So `warmup()`
compiles every shape the engine can ever run, and after it nothing compiles, whatever the mix
of query lengths, item lengths, item counts and labels within the config's limits.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mis_kernels.block_attention import KEY_TILES, BlockMeta
from models.adapter_slots import AdapterSlots
from models.adapters import (
    LORA_MODULES,
    LoraAdapter,
    check_head_room,
    head_width,
    load_adapter,
    load_checked_adapter,
    lora_features,
)
from models.buckets import pow2_bucket, pow2_upto
from models.checkpoint import load_checkpoint, read_hf_config
from models.config import ModelConfig
from models.decoder import Decoder, Lora, StreamShape, init_shape
from models.engine_config import MIN_ROWS, Attention, EngineConfig
from models.inputs import Chunk, EngineBroken, ScoringInputError, UnknownAdapter, check_chunk
from models.parallel import (
    kv_pool_sharding,
    param_shardings,
    replicated,
    shard_params,
    to_host,
    tp_config,
    tp_mesh,
)
from models.plan import Forward, Mode, plan, stream_ladder
from models.pool import PrefixPool

log = logging.getLogger(__name__)

HEAD_ROWS = 512  # score positions per LM-head call, at most
POOL_ALIGN = 128  # pool ranges start at multiples of this (the Pallas TPU tile)
STATS = ("items", "forwards", "tokens", "padded_tokens", "prefix_hits", "prefix_misses", "compiles")


class Engine(Protocol):
    """What a scorer replica needs of an engine: ScoringEngine (one process) and
    serve_app.slice.SliceEngine (one program over a multi-host slice) implement it."""

    config: EngineConfig

    def score(self, chunks: Sequence[Chunk]) -> list[np.ndarray | ScoringInputError]:
        """Scores [items, labels] (float64) per chunk, or the chunk's input error in its
        place; a bad chunk does not affect the others. A classification engine
        (ScoringEngine.head_kind "classification") returns [items, classes] and reads no
        label ids."""
        ...

    def warmup(self, part: tuple[int, int] = (0, 1)) -> dict[str, float]:
        """Compile every shape the engine can run; returns {"shapes": n, "seconds": s}.
        `part` = (i, n): this is the i-th of n engines warming up at once over one compilation
        cache (staggered)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters (STATS): items, forwards, tokens, padded_tokens, prefix_hits,
        prefix_misses, compiles."""
        ...

    def compile_seconds(self) -> float:
        """Seconds this engine has spent compiling, the compile running now included: a
        deadline on a forward (the Scorer's forward_timeout_s) does not count them."""
        ...

    def check_adapter(self, path: str | Path, digest: str | None = None) -> Any:
        """LoRA adapter `path` read and checked, not yet served (any thread, while scoring);
        raises ValueError or OSError saying why not."""
        ...

    def register_adapter(self, name: str, adapter: Any) -> None:
        """Serve check_adapter's `adapter` as `name` from the next engine call on."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` from the next engine call on."""
        ...


COMPILATION_CACHE_BYTES = 4 * 2**30  # least recently used programs go beyond this


def use_compilation_cache(directory: Path) -> None:
    """Keep this process' compiled programs in `directory` (JAX's persistent cache, every
    program however quick to compile, at most COMPILATION_CACHE_BYTES), so an engine started
    again with the same model and settings loads its warm-up shapes from there. Where
    JAX_COMPILATION_CACHE_DIR already names a cache, that one is used as JAX's settings say."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    log.info("compiled programs cached in %s", jax.config.jax_compilation_cache_dir)


def staggered(costs: Sequence[float], i: int, n: int) -> list[int]:
    """The warm-up order (indices into `costs`, each shape's compile cost) of the i-th of n
    engines starting at once over one compilation cache (a deployment's replicas on one host):
    each begins where its n-th of the total cost begins and wraps round, so it compiles its
    share while the others compile theirs, then finds most of the rest in the cache instead of
    every engine compiling every shape on the same cores."""
    if n < 1:
        raise ValueError(f"{n=}: engines warming up at once, at least 1")
    total, cum, start = sum(costs), 0.0, 0
    for k, cost in enumerate(costs):
        if cum >= total * (i % n) / n:
            start = k
            break
        cum += cost
    order = list(range(len(costs)))
    return order[start:] + order[:start]


def resolve_attention(requested: Attention) -> Attention:
    """`auto` -> what runs best and has been verified on this backend: the XLA kernel
    everywhere until the Pallas kernel has passed its tests natively on a GPU/TPU (its
    interpret-mode and lowering tests pass; see README: Accelerators)."""
    if requested is not Attention.AUTO:
        return requested
    return Attention.XLA


def pool_rows(config: EngineConfig) -> int:
    """Tokens of the device pool per layer and kv head: the prefix pool (prefix mode) and one
    big key tile of padding (packed and serial modes read no pool, and get the padding)."""
    return (config.prefix_pool_tokens if config.mode is Mode.PREFIX else 0) + KEY_TILES[0]


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    cfg: ModelConfig
    dtype: str
    mesh: Any
    kind: str  # "body" | "head"
    shape: tuple  # everything else the program's shapes depend on


# Compiled programs by what they compute, shared by every engine of this process: equal engines
# (tests, benchmarks building one per mode) compile each program once.
_PROGRAMS: dict[_ProgramKey, Any] = {}


class ScoringEngine:
    """Loads a HF checkpoint and scores chunks; thread-compatible, not thread-safe."""

    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        adapters: dict[str, str] | None = None,
    ):
        """`adapters`: LoRA adapters to serve, peft's directory by name (add_adapter)."""
        self.config = config = config or EngineConfig()
        self.model_dir = Path(model_dir)
        self.cfg, params = load_checkpoint(self.model_dir, config.dtype)
        # The head the checkpoint's architecture chose: "lm" (scores at label tokens) or
        # "classification" (every class's logit; chunks carry no label ids).
        self.head_kind: str = self.cfg.head.value
        self.class_labels: tuple[str, ...] = self.cfg.class_labels
        self.dtype_name = config.dtype or self.cfg.dtype
        self.dtype = jnp.dtype(self.dtype_name)
        self.vocab_size = self.cfg.vocab_size
        tp = config.tp_size
        self.mesh = tp_mesh(tp) if tp > 1 or jax.process_count() > 1 else None
        self.run_cfg = tp_config(self.cfg, tp)
        if self.mesh is None:
            self.params = jax.device_put(params)
        else:
            self.params = shard_params(params, self.cfg, self.mesh)
            log.info(
                "tensor parallel over %d devices (%s): %d q heads, %d kv heads%s per device",
                tp,
                self.mesh.devices.flat[0].platform,
                self.cfg.num_heads // tp,
                self.run_cfg.num_kv_heads // tp,
                " (repeated)" if self.run_cfg.num_kv_heads > self.cfg.num_kv_heads else "",
            )
        self.attention = resolve_attention(config.attention)
        log.info(
            "engine: %s mode, %s attention (%s requested), blocks of %d tokens in tiles of %d, "
            "forwards of up to %d tokens, items of up to %d",
            config.mode.value,
            self.attention.value,
            config.attention.value,
            config.block,
            config.tile,
            config.max_batch_tokens,
            config.max_item_tokens,
        )
        if self.attention in (Attention.PALLAS, Attention.DENSE):
            # Both sum a token's own keys in absolute order within its block (dense: over the
            # whole stream), so an item's last bits follow its offset there: what else shared
            # the forward. The XLA kernel sums them in relative order (README: Modes).
            log.warning(
                "%s attention is not batch-invariant: an item's scores may move in the last "
                "float32 bits (~1e-6) with what shares its forward; `xla` (auto's choice) is exact",
                self.attention.value,
            )
        prefix = config.mode is Mode.PREFIX
        self.pool = PrefixPool(config.prefix_pool_tokens, POOL_ALIGN) if prefix else None
        # Device pool: [layers, kv heads, tokens + one big tile of padding, head_dim]; packed
        # and serial modes read no pool, and get one tile of zeros.
        shape = (
            self.run_cfg.num_layers,
            self.run_cfg.num_kv_heads,
            pool_rows(config),
            self.cfg.head_dim,
        )
        sharding = None if self.mesh is None else kv_pool_sharding(self.mesh)
        self._pool_kv = tuple(
            jax.device_put(jnp.zeros(shape, self.dtype), sharding) for _ in range(2)
        )
        # LoRA adapters: the registry, which are resident, and their device slots (per module
        # A [layers, slots + 1, in, rank], B [layers, slots + 1, rank, out]; slot 0 zeros).
        self.adapter_slots = AdapterSlots(config.max_adapters)
        self._adapters: dict[str, LoraAdapter] = {}
        self._lora = self._empty_lora() if config.max_adapters else None
        # Adapters' own classification heads (modules_to_save): per slot [slots + 1, classes,
        # hidden], as wide as the widest head served at start (slot 0 and an adapter without
        # a head: zeros, its rows read the base's head). On a classifier base always (its
        # adapters may bring one later); on an LM base when an adapter at start turns it into
        # a classifier.
        self._heads: jax.Array | None = None
        self._heads_fixed = False  # the heads' width is set: wider heads are refused
        self._slot_has_head = np.zeros(config.max_adapters + 1, bool)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        has_heads = any(a.head is not None for a in self._adapters.values())
        if config.max_adapters and (self.cfg.num_labels or has_heads):
            self._heads = self._empty_heads()
        self._heads_fixed = True
        # The pad token a classification head's pooling skips (models/plan.py): the base's, or
        # for an LM base's classifier adapters its config.json's, as transformers reads it
        # when it builds the sequence classifier from that checkpoint.
        self._pad_id = self.cfg.pad_token_id
        if not self.cfg.num_labels and has_heads:
            pad = read_hf_config(self.model_dir).get("pad_token_id")
            if pad is not None and not isinstance(pad, int):  # as for a classifier's config
                raise ValueError(f"pad_token_id {pad}: expected one token id")
            self._pad_id = pad
        self._stats: collections.Counter[str] = collections.Counter()
        self.broken: str | None = None  # why this engine must not score again (EngineBroken)
        self._compile_s = 0.0  # compile_seconds(): finished compiles, and since when one runs
        self._compiling_since: float | None = None
        self._compile_lock = threading.Lock()  # read by the scorer's event loop thread

    # ----------------------------------------------------------------- adapters

    def add_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        """Serve the LoRA adapter at `path` (peft's files) as `name`, replacing one of that
        name; a bad adapter raises ValueError naming the field and changes nothing."""
        adapter = self.check_adapter(path)
        self.register_adapter(name, adapter)
        return adapter

    def check_adapter(self, path: str | Path, digest: str | None = None) -> LoraAdapter:
        """The adapter at `path` read and checked against this engine, not yet served: no
        engine state changes, so a replica can read one in a thread while it scores. `digest`:
        its files' adapter_digest, checked (ValueError if they changed)."""
        if not self.config.max_adapters:
            raise ValueError("max_adapters: 0, this engine runs no adapters")
        if digest is None:
            adapter = load_adapter(path, self.cfg, self.config.max_lora_rank)
        else:
            adapter, _ = load_checked_adapter(path, self.cfg, self.config.max_lora_rank, digest)
        if self._heads_fixed:
            check_head_room(adapter, 0 if self._heads is None else self._heads.shape[1])
        return adapter

    def register_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Serve `adapter` (check_adapter's) as `name`; between engine calls only."""
        self._forget_queries(name)  # one it replaces
        self._adapters[name] = adapter
        self.adapter_slots.register(name)
        log.info(
            "adapter %r: rank %d on %s, from %s",
            name,
            adapter.rank,
            ", ".join(sorted(adapter.lora)),
            adapter.path,
        )

    def classes(self, adapter: str | None = None) -> tuple[str, ...]:
        """The class labels a chunk of `adapter` (None: the base) is scored with: its own
        head's, or the base's (() for an LM head)."""
        return self.class_labels if adapter is None else self._adapters[adapter].class_labels

    def head_of(self, adapter: str | None = None) -> tuple[str, tuple[str, ...]]:
        """("lm", ()) or ("classification", classes): how chunks of `adapter` are scored (an
        LM base's adapter with a head of its own scores classes)."""
        classes = self.classes(adapter)
        return ("classification" if classes else "lm"), classes

    def _classifies(self, adapter: str | None) -> bool:
        """Whether `adapter`'s chunks are scored by a classification head (no label ids)."""
        return bool(self.cfg.num_labels) or (
            adapter in self._adapters and self._adapters[adapter].head is not None
        )

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name`; between engine calls only."""
        self._forget_queries(name)
        del self._adapters[name]
        self.adapter_slots.remove(name)

    def _forget_queries(self, name: str) -> None:
        """Free the prefix pool of the queries cached under adapter `name`'s registration
        (removed or replaced: no later call reads them, as its next registration gets another
        key) now, not when they would be evicted."""
        if self.pool is None or name not in self.adapter_slots:
            return
        key = self.adapter_slots.key(name)
        # models/plan.py: an adapter's query is cached under (its key, tokens), the base's
        # under its tokens alone.
        self.pool.forget(
            k for k in self.pool.cached() if len(k) == 2 and isinstance(k[1], tuple) and k[0] == key
        )

    def adapters(self) -> dict[str, LoraAdapter]:
        return dict(self._adapters)

    def _empty_lora(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        c, r = self.run_cfg, self.config.max_lora_rank  # run_cfg: KV heads as the devices hold
        slots = self.config.max_adapters + 1
        features = {m: lora_features(c, m) for m in LORA_MODULES}
        sharding = None if self.mesh is None else replicated(self.mesh)

        def zeros(*shape):
            return jax.device_put(jnp.zeros((c.num_layers, slots, *shape), self.dtype), sharding)

        return {m: (zeros(i, r), zeros(r, o)) for m, (i, o) in features.items()}

    def _empty_heads(self) -> jax.Array:
        heads = (a.num_labels for a in self._adapters.values() if a.head is not None)
        width = head_width(self.cfg, heads)
        shape = (self.config.max_adapters + 1, width, self.cfg.hidden_size)
        sharding = None if self.mesh is None else replicated(self.mesh)
        return jax.device_put(jnp.zeros(shape, self.dtype), sharding)

    def _load_slot(self, name: str, slot: int) -> None:
        """Write adapter `name`'s weights into device slot `slot` (zeros where it has none)."""
        adapter = self._adapters[name]
        if self._heads is not None:
            self._slot_has_head[slot] = False  # until its head is written
            if adapter.head is not None:
                head = np.zeros(self._heads.shape[1:], np.float32)
                head[: adapter.num_labels] = adapter.head
                self._heads = _set_head(self._heads, slot, jnp.asarray(head, self.dtype))
                self._slot_has_head[slot] = True
        repeat = self.run_cfg.num_kv_heads // self.cfg.num_kv_heads  # tensor parallel's copies
        lora = {}
        for module, (a_dev, b_dev) in self._lora.items():
            a = np.zeros(a_dev.shape[:1] + a_dev.shape[2:], np.float32)
            b = np.zeros(b_dev.shape[:1] + b_dev.shape[2:], np.float32)
            if module in adapter.lora:
                a_host, b_host = adapter.lora[module]
                if repeat > 1 and module in ("k_proj", "v_proj"):
                    layers, rank, out = b_host.shape
                    b_host = b_host.reshape(layers, rank, self.cfg.num_kv_heads, -1)
                    b_host = np.repeat(b_host, repeat, axis=2).reshape(layers, rank, -1)
                a[:, :, : a_host.shape[2]] = a_host
                b[:, : b_host.shape[1], :] = b_host
            lora[module] = (
                _set_slot(a_dev, slot, jnp.asarray(a, self.dtype)),
                _set_slot(b_dev, slot, jnp.asarray(b, self.dtype)),
            )
            self._lora[module] = lora[module]  # the old arrays were donated

    def _adapter_slots(self, chunks: list[Chunk | None], out: list) -> list[tuple[int, int]] | None:
        """Per chunk (device slot, pool key) of its adapter, loading the ones not resident;
        a chunk naming an adapter not served gets its error in `out` and is dropped."""
        if self._lora is None and all(c is None or c.adapter is None for c in chunks):
            return None
        names = []
        for ci, c in enumerate(chunks):
            if c is None or c.adapter is None:
                continue
            if c.adapter not in self._adapters:
                served = sorted(self._adapters)
                out[ci] = UnknownAdapter(
                    f"model: no adapter {c.adapter!r} is served (adapters: {served})"
                )
                chunks[ci] = None
                continue
            names.append(c.adapter)
        slots, loads = self.adapter_slots.assign(names)
        for k, (name, slot) in enumerate(loads):
            try:
                self._load_slot(name, slot)
            except BaseException:
                # This load and the ones after it never happened: their slots hold other
                # weights (or half of these), so no adapter counts as resident there.
                for _, s in loads[k:]:
                    self.adapter_slots.drop(s)
                raise
        return [
            (0, 0)
            if c is None or c.adapter is None
            else (slots[c.adapter], self.adapter_slots.key(c.adapter))
            for c in chunks
        ]

    # ----------------------------------------------------------------- interface

    def score(self, chunks: Sequence[Chunk]) -> list[np.ndarray | ScoringInputError]:
        if self.broken is not None:
            raise EngineBroken(self.broken)
        named = list(dict.fromkeys(c.adapter for c in chunks if c.adapter is not None))
        if len(named) > max(self.config.max_adapters, 1):
            # More adapters than device slots: one call per group of chunks that fits.
            return self._score_in_groups(chunks, named)
        out: list[np.ndarray | ScoringInputError | None] = [None] * len(chunks)
        valid: list[Chunk | None] = []
        for ci, c in enumerate(chunks):
            classes = self._classifies(c.adapter)
            try:
                check_chunk(c, self.vocab_size, self.config.limits, classification=classes)
                # A classification head reads no label ids: none take label columns.
                valid.append(dataclasses.replace(c, label_ids=()) if classes else c)
            except ScoringInputError as e:
                out[ci] = e
                valid.append(None)
        adapters = self._adapter_slots(valid, out)
        try:
            p = plan(
                valid,
                self.config.mode,
                block=self.config.block,
                tile=self.config.tile,
                max_blocks=self.config.max_blocks,
                max_labels=self.config.max_labels,
                pool=self.pool,
                pad_id=self._pad_id,  # a classification head's pooling
                adapters=adapters,
            )
        except BaseException:
            self._rollback()
            raise
        self._stats["prefix_hits"] += p.prefix_hits
        self._stats["prefix_misses"] += p.prefix_misses
        classify = {ci: self._classifies(c.adapter) for ci, c in enumerate(valid) if c is not None}
        width = {
            ci: len(self.classes(c.adapter)) if classify[ci] else len(c.label_ids)
            for ci, c in enumerate(valid)
            if c is not None
        }
        results = {
            ci: (np.zeros((len(c.items), width[ci]), np.float32), np.zeros(len(c.items)))
            for ci, c in enumerate(valid)
            if c is not None
        }
        for f in p.forwards:
            try:
                ll, lse, own = self._run(f)
            except BaseException:
                # This forward's queries and every later one's were allocated in the pool but
                # not (all) written: a later call must prefill them again, never read them.
                self._rollback()
                raise
            if self.pool is not None:
                self.pool.commit(f.fills)
            dest = np.asarray(f.dest, np.int64).reshape(-1, 2)  # per score: (chunk, item)
            for ci in map(int, np.unique(dest[:, 0])):  # one copy per chunk, not per item
                rows = np.flatnonzero(dest[:, 0] == ci)
                items = dest[rows, 1]
                logits = ll
                if classify[ci] and own is not None:  # an LM base's adapter's own head
                    logits = own
                cols = np.arange(width[ci]) if classify[ci] else f.label_cols[ci]
                results[ci][0][items] = logits[np.ix_(rows, cols)]
                results[ci][1][items] = lse[rows]
        for ci, (ll, lse) in results.items():
            soft = valid[ci].apply_softmax  # type: ignore[union-attr]
            out[ci] = finish_classes(ll, soft) if classify[ci] else finish_scores(ll, lse, soft)
            self._stats["items"] += len(ll)
        return out  # type: ignore[return-value]

    def _score_in_groups(
        self, chunks: Sequence[Chunk], named: list[str]
    ) -> list[np.ndarray | ScoringInputError]:
        per = max(self.config.max_adapters, 1)
        groups = [set(named[i : i + per]) for i in range(0, len(named), per)]
        out: list[np.ndarray | ScoringInputError | None] = [None] * len(chunks)
        for k, group in enumerate(groups):
            # The base's chunks go with the first group.
            idx = [
                i
                for i, c in enumerate(chunks)
                if c.adapter in group or (k == 0 and c.adapter is None)
            ]
            for i, result in zip(idx, self.score([chunks[i] for i in idx]), strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    def warmup(self, part: tuple[int, int] = (0, 1)) -> dict[str, float]:
        start, before = time.perf_counter(), self._stats["compiles"]
        # (compile cost, program): a body compiled in ~4x an LM head's time on CPU (1.1 s vs
        # 0.25 s, test model), whatever its length. The costs only balance the staggered
        # orders (every order holds every shape).
        shapes = [
            *(
                (4.0, functools.partial(self._body, n * self.config.block))
                for n in stream_ladder(self.config.max_blocks, self.config.per_tile)
            ),
            *((1.0, functools.partial(self._head, r)) for r in pow2_upto(HEAD_ROWS, MIN_ROWS)),
        ]
        for k in staggered([cost for cost, _ in shapes], *part):
            shapes[k][1]()
        report = {
            "shapes": float(self._stats["compiles"] - before),
            "seconds": time.perf_counter() - start,
        }
        log.info(
            "warm-up: %d shapes ready in %.1f s (every shape this engine can run; compiled, "
            "or loaded from the compilation cache; share %d of %d first)",
            report["shapes"],
            report["seconds"],
            part[0] % part[1] + 1,
            part[1],
        )
        return report

    def stats(self) -> dict[str, int]:
        return {key: self._stats[key] for key in STATS}

    def compile_seconds(self) -> float:
        with self._compile_lock:
            since, done = self._compiling_since, self._compile_s
        return done + (0.0 if since is None else time.perf_counter() - since)

    # ----------------------------------------------------------------- execution

    def _program(self, kind: str, shape: tuple, build) -> Any:
        key = _ProgramKey(self.run_cfg, self.dtype_name, self.mesh, kind, shape)
        program = _PROGRAMS.get(key)
        if program is None:
            start = self._compiling_since = time.perf_counter()
            try:
                program = _PROGRAMS[key] = build()
            finally:
                with self._compile_lock:
                    self._compile_s += time.perf_counter() - start
                    self._compiling_since = None
            self._stats["compiles"] += 1
            log.info("compiled %s %s in %.1f s", kind, shape, time.perf_counter() - start)
        return program

    def _body(self, tokens: int):
        tile = min(self.config.tile, tokens)  # a stream shorter than a tile is one
        shape = StreamShape(tokens, self.config.block, tile, self.attention, KEY_TILES)

        pool_tokens = self.pool.tokens if self.pool is not None else 0

        def build():
            model = Decoder(self.run_cfg, shape, self.dtype, self.mesh)

            def body(
                params, pool_k, pool_v, tokens, pos, prefix, own, local_start, write_idx, *lora
            ):
                hidden, (k, v) = model.apply(
                    {"params": params},
                    tokens,
                    pos,
                    BlockMeta(prefix, own, local_start),
                    pool_k,
                    pool_v,
                    Lora(*lora) if lora else None,
                    method=Decoder.body,
                )
                # This forward's K/V [layers, T, kv, dim] into the pool where it keeps a query.
                # The plan marks the rest with indices >= the pool's size; the array has a tile
                # of padding rows past that, so those are sent past the array's end: dropped.
                write_idx = jnp.where(write_idx < pool_tokens, write_idx, pool_k.shape[2])
                pool_k = pool_k.at[:, :, write_idx].set(k.swapaxes(1, 2), mode="drop")
                pool_v = pool_v.at[:, :, write_idx].set(v.swapaxes(1, 2), mode="drop")
                # Padded to the longest stream: the LM head then has one input shape.
                rows = self.config.max_batch_tokens - tokens.shape[0]
                return jnp.pad(hidden, [(0, rows), (0, 0)]), pool_k, pool_v

            ints = jax.ShapeDtypeStruct((tokens,), jnp.int32)
            meta = (
                jax.ShapeDtypeStruct((tokens // self.config.block, 3), jnp.int32),  # prefix
                jax.ShapeDtypeStruct((tokens // self.config.block, 4), jnp.int32),  # own
            )
            args = (self.params, *self._pool_kv, ints, ints, *meta)
            args += (ints, ints)
            if self._lora is not None:  # weights, each block's slot, whether any is used
                blocks = jax.ShapeDtypeStruct((tokens // self.config.block,), jnp.int32)
                args += (self._lora, blocks, jax.ShapeDtypeStruct((), jnp.bool_))
            return self._compile(body, args, outs=3, pool_args=(1, 2))

        pool_rows, padded = self._pool_kv[0].shape[2], self.config.max_batch_tokens
        lora = (self.config.max_adapters, self.config.max_lora_rank) if self._lora else None
        return self._program("body", (shape, pool_rows, padded, lora), build)

    def _head(self, rows: int):
        labels = self.config.max_labels
        heads = None if self._heads is None else self._heads.shape

        def build():
            model = Decoder(self.run_cfg, init_shape(), self.dtype, self.mesh)

            def head(params, hidden, score_idx, label_ids, *adapter_heads):
                return model.apply(
                    {"params": params},
                    hidden,
                    score_idx,
                    label_ids,
                    adapter_heads or None,
                    method=Decoder.head,
                )

            hidden = (self.config.max_batch_tokens, self.cfg.hidden_size)
            args = (
                self.params,
                jax.ShapeDtypeStruct(hidden, self.dtype),
                jax.ShapeDtypeStruct((rows,), jnp.int32),
                jax.ShapeDtypeStruct((labels,), jnp.int32),
            )
            if heads is not None:  # the heads' stack, and each row's slot
                args += (
                    jax.ShapeDtypeStruct(heads, self.dtype),
                    jax.ShapeDtypeStruct((rows,), jnp.int32),
                )
            # An LM base's adapter heads: a third output, their class logits.
            outs = 3 if heads is not None and not self.cfg.num_labels else 2
            return self._compile(head, args, outs=outs, pool_args=())

        key = (rows, labels, self.config.max_batch_tokens, heads)
        return self._program("head", key, build)

    def _compile(self, fn, args, *, outs: int, pool_args: tuple[int, ...]):
        """jit -> lower -> compile, with the mesh's shardings (host inputs replicated, the
        pool split by kv head and updated in place)."""
        if self.mesh is None:
            jitted = jax.jit(fn, donate_argnums=pool_args)
        else:
            rep, pool = replicated(self.mesh), kv_pool_sharding(self.mesh)
            ins = [param_shardings(self.params, self.mesh)] + [rep] * (len(args) - 1)
            for i in pool_args:
                ins[i] = pool
            out_sh = (rep,) * (outs - len(pool_args)) + (pool,) * len(pool_args)
            jitted = jax.jit(
                fn, in_shardings=tuple(ins), out_shardings=out_sh, donate_argnums=pool_args
            )
        return jitted.lower(*args).compile()

    def _break(self, error: BaseException) -> None:
        """The device pool may be gone or half written: never score again (EngineBroken)."""
        self.broken = f"a forward failed after the device pool was donated to it: {error!r}"
        if self.pool is not None:
            self.pool.clear()
        log.error("engine broken: %s", self.broken)

    def _rollback(self) -> None:
        if self.pool is not None and (dropped := self.pool.rollback()):
            log.warning("a failed engine call: %d queries it meant to cache dropped", len(dropped))

    def _run(self, f: Forward) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The forward's (label or class logits [S, width], log-sum-exp [S], and on an LM base
        with adapter heads their class logits [S, classes], else None), per score."""
        t = len(f.tokens)
        body = self._body(t)  # a compile error here has touched nothing
        pool_in = self._pool_kv
        lora = ()
        if self._lora is not None:
            lora = (self._lora, f.block_slot, np.bool_(f.block_slot.any()))
        try:
            hidden, *pool_out = body(
                self.params,
                *pool_in,
                f.tokens,
                f.pos,
                f.prefix,
                f.own,
                f.local_start,
                f.write_idx,
                *lora,
            )
        except BaseException as e:
            if any(a.is_deleted() for a in pool_in):  # donated to the program that failed
                self._break(e)
            raise
        self._pool_kv = tuple(pool_out)
        try:
            jax.block_until_ready(self._pool_kv)  # an execution error surfaces here
        except BaseException as e:
            self._break(e)
            raise
        pieces = []
        for start in range(0, len(f.score_idx), HEAD_ROWS):
            idx = f.score_idx[start : start + HEAD_ROWS]
            rows = pow2_bucket(len(idx), MIN_ROWS)
            padded = np.zeros(rows, np.int32)
            padded[: len(idx)] = idx
            heads = ()
            if self._heads is not None:  # a row's slot: its block's, where that has a head
                slot = f.block_slot[padded // self.config.block]
                row_slot = np.where(self._slot_has_head[slot], slot, 0).astype(np.int32)
                row_slot[len(idx) :] = 0
                heads = (self._heads, row_slot)
            ll, lse, *own = self._head(rows)(self.params, hidden, padded, f.labels, *heads)
            pieces.append((ll, lse, own[0] if own else None, len(idx)))
        self._stats["forwards"] += 1
        self._stats["tokens"] += f.real_tokens
        self._stats["padded_tokens"] += t - f.real_tokens
        if not pieces:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32), None
        ll = np.concatenate([to_host(a)[:n] for a, _, _, n in pieces])
        lse = np.concatenate([to_host(b)[:n] for _, b, _, n in pieces])
        own = None
        if pieces[0][2] is not None:
            own = np.concatenate([to_host(c)[:n] for _, _, c, n in pieces])
        return ll, lse, own


@functools.partial(jax.jit, donate_argnums=0)
def _set_head(stack: jax.Array, slot, head: jax.Array) -> jax.Array:
    """The heads' stack [slots, classes, hidden] with slot `slot` set, in place."""
    return stack.at[slot].set(head)


@functools.partial(jax.jit, donate_argnums=0)
def _set_slot(stack: jax.Array, slot, weights: jax.Array) -> jax.Array:
    """stack [layers, slots, ...] with slot `slot` set to weights [layers, ...], in place (the
    old stack donated: a load never holds two copies of every adapter)."""
    return stack.at[:, slot].set(weights)


def score_ids(
    engine: Engine,
    query: Sequence[int],
    items: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    apply_softmax: bool = False,
    item_first: bool = False,
) -> np.ndarray:
    """Scores [len(items), len(label_ids)] of one token-id request (a convenience over
    `Engine.score`); raises ScoringInputError for bad input."""
    chunk = Chunk(
        tuple(query), tuple(map(tuple, items)), tuple(label_ids), apply_softmax, item_first
    )
    (result,) = engine.score([chunk])
    if isinstance(result, ScoringInputError):
        raise result
    return result


def finish_classes(logits: np.ndarray, apply_softmax: bool) -> np.ndarray:
    """Classification scores from f32 class logits [items, classes]: the raw logits, or the
    class probabilities (softmax over the classes; the sigmoid of a single class's logit)."""
    z = logits.astype(np.float64)
    if not apply_softmax:
        return z
    if z.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def finish_scores(label_logits: np.ndarray, lse: np.ndarray, apply_softmax: bool) -> np.ndarray:
    """Scores from f32 label logits and the full-vocab log-sum-exp (DESIGN.md section 1)."""
    ll = label_logits.astype(np.float64)
    if apply_softmax:
        z = np.exp(ll - ll.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)
    return np.exp(ll - lse.astype(np.float64)[:, None])
