"""The decoder of every supported family (Qwen3, Qwen2, Llama, Mistral, Gemma, Gemma 2, Gemma 3)
in Flax, shaped for multi-item scoring: one forward driven by ModelConfig's switches
(models/config.py), read in the few places they matter, and a head at the end (the LM head at
label tokens, or a sequence-classification head).

A forward is two programs. `body` runs a flat stream of T tokens, cut into blocks (the mask
and its metadata: mis_kernels/block_attention.py), through the layers and returns the hidden states
and each layer's K/V (the engine writes a query's K/V into its pool). `head` runs the LM head at
the score positions only. So the stream's length and the number of scores are two separate short
ladders of compiled shapes, not a product. Layers are stacked (`nn.scan` makes the parameters,
a plain `lax.scan` applies them), so compile time does not grow with depth and a layer is
traced once. Numerics follow HF transformers: RMSNorm and softmax in float32,
RoPE with rotate-half and float32 angles; Gemma's norms scale by (1 + w) in float32.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mis_kernels.block_attention import KEY_TILES, BlockMeta, block_attention, dense_attention
from mis_kernels.ragged_attention import ragged_block_attention
from models.config import Head, ModelConfig, RopeScaling
from models.engine_config import Attention
from models.parallel import over_heads


@dataclasses.dataclass(frozen=True)
class StreamShape:
    """Static shape of one forward's stream: `tokens` tokens in blocks of `block`, grouped in
    tiles of `tile` (the rows that score against a query's keys as one product)."""

    tokens: int
    block: int
    tile: int
    attention: Attention
    key_tiles: tuple[int, int] = KEY_TILES  # XLA: big and small key tiles of a range

    def __post_init__(self) -> None:
        if self.attention is Attention.AUTO:
            raise ValueError("resolve attention 'auto' before building a stream shape")
        if self.tile % self.block or self.tokens % self.tile:
            raise ValueError(
                f"{self.tokens=} must be a multiple of {self.tile=}, itself of {self.block=}"
            )


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    offset: bool = False  # Gemma: scale by (1 + w), the product in float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        # Mean square as a dot, not a fused reduce: XLA:CPU's reduce+rsqrt fusion rounds
        # differently for different row counts, which would let one item's length change
        # another item's score in the last bit (isolation must be exact).
        inv_d = jnp.full((x.shape[-1],), 1.0 / x.shape[-1], jnp.float32)
        mean_sq = jnp.einsum("...d,d->...", x32 * x32, inv_d)[..., None]
        y = x32 * jax.lax.rsqrt(mean_sq + self.eps)
        if self.offset:  # HF Gemma: (norm(x.float()) * (1 + w.float())).type_as(x)
            return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale * y.astype(x.dtype)  # HF: weight * hidden.to(input_dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """HF's RoPE frequencies `1 / theta ** (arange(0, d, 2) / d)`, rounded to float32 where HF
    rounds, with a correctly rounded pow, computed once on the host.

    Not inside the jitted program: there XLA evaluates the pow itself, one or two ulps off HF's
    value (and not necessarily the same in every program or on every CPU), and an angle is
    `position * inv_freq`, so an ulp of a frequency becomes an angle error that grows with the
    position: cos/sin were up to 1e-3 off HF's at position 8704 for the Qwen3-0.6B shape, and
    long queries lost precision against the float64 reference (tests/test_long_query.py).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    if scaling is None:
        return inv_freq
    return _scaled(inv_freq, scaling)


def _scaled(inv_freq: np.ndarray, sc: RopeScaling) -> np.ndarray:
    """transformers' `linear` and `llama3` frequency scaling, op for op in float32 (a python
    number divided by a tensor is torch's reciprocal times the number)."""
    f32 = np.float32
    factor = f32(sc.factor)
    if sc.rope_type == "linear":
        return inv_freq / factor
    if sc.rope_type != "llama3":
        raise ValueError(f"rope_type {sc.rope_type!r} is not supported")
    old = sc.original_max_position_embeddings
    low_wavelen = old / sc.low_freq_factor  # python floats, as in transformers
    high_wavelen = old / sc.high_freq_factor
    wavelen = (f32(1.0) / inv_freq) * f32(2 * np.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((f32(1.0) / wavelen) * f32(old) - f32(sc.low_freq_factor)) / f32(
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    pos: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., head_dim] for RoPE positions `pos` (float32, as HF computes them)."""
    freqs = pos.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


@dataclasses.dataclass(frozen=True)
class Lora:
    """A layer's LoRA adapters and which one each block of the stream uses: per module
    (LORA_MODULES) A [slots, in, rank] and B [slots, rank, out] (the scaling in B; slot 0 all
    zeros: the base model), `block_slot` [T / block] int32, `any` whether a block uses one.

    Per block, not per token: a block holds one sequence's tokens or one query's items
    (models/plan.py), and a query is cached and batched per adapter, so every block has one
    adapter. Each block's product is its own [block, in] x [in, rank] x [rank, out], the same
    arithmetic whichever adapters the other blocks use (scores bit-identical however chunks
    of different adapters are batched), and one pass over the stream whatever the mix. A base
    block adds an exact zero; a forward with no adapter skips the products."""

    weights: dict[str, tuple[jax.Array, jax.Array]]
    block_slot: jax.Array
    any: jax.Array


jax.tree_util.register_dataclass(Lora, data_fields=["weights", "block_slot", "any"], meta_fields=[])


def lora_delta(x: jax.Array, lora: Lora | None, name: str, out_shape: tuple[int, ...]):
    """The adapters' term of projection `name` for x [T, ...in] -> [T, *out_shape], or None."""
    if lora is None or name not in lora.weights:
        return None
    a, b = lora.weights[name]
    nb = lora.block_slot.shape[0]
    t = x.shape[0]
    xb = x.reshape(nb, t // nb, -1)

    def products():
        a_blk = jnp.take(a, lora.block_slot, axis=0)  # [nb, in, rank]
        b_blk = jnp.take(b, lora.block_slot, axis=0)  # [nb, rank, out]
        xa = jnp.einsum("nti,nir->ntr", xb, a_blk)
        return jnp.einsum("ntr,nro->nto", xa, b_blk).reshape(t, *out_shape)

    return jax.lax.cond(lora.any, products, lambda: jnp.zeros((t, *out_shape), x.dtype))


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta.astype(y.dtype)


class SelfAttention(nn.Module):
    cfg: ModelConfig
    shape: StreamShape
    dtype: jnp.dtype
    mesh: Mesh | None = None  # tensor parallel: attention runs per device's heads

    @nn.compact
    def __call__(self, x, cos, sin, meta: BlockMeta, pool_k, pool_v, window=None, lora=None):
        cfg = self.cfg

        def dense(feats, bias, name, axis=-1):
            layer = nn.DenseGeneral(
                feats, axis=axis, use_bias=bias, name=name, dtype=self.dtype, param_dtype=self.dtype
            )
            feats = feats if isinstance(feats, tuple) else (feats,)
            return lambda h: _plus(layer(h), lora_delta(h, lora, name, feats))

        with jax.named_scope("qkv"):
            q = dense((cfg.num_heads, cfg.head_dim), cfg.qkv_bias, "q_proj")(x)  # [T, H, D]
            k = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "k_proj")(x)  # [T, K, D]
            v = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "v_proj")(x)
            if cfg.qk_norm:
                q = RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset, name="q_norm")(q)
                k = RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset, name="k_norm")(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        t = x.shape[0]
        arrays = {
            "q": q.reshape(t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim),
            "k": k,
            "v": v,
            "pool_k": pool_k,
            "pool_v": pool_v,
            "prefix": meta.prefix,
            "own": meta.own,
            "local_start": meta.local_start,
        }
        if window is not None:  # sliding window: this layer's, and the tokens' positions
            arrays |= {"pos": meta.pos, "window": window}
        with jax.named_scope("attention"):
            heads = {"q": 1, "k": 1, "v": 1, "pool_k": 0, "pool_v": 0}  # their head axes
            scale = None if cfg.query_pre_attn_scalar is None else cfg.attn_scale
            attend = partial(_attend, self.shape, self.mesh is not None, scale, cfg.attn_softcap)
            o = over_heads(attend, self.mesh, heads)(arrays)
        o = o.reshape(t, cfg.num_heads, cfg.head_dim)
        return dense(cfg.hidden_size, cfg.o_bias, "o_proj", axis=(-2, -1))(o), (k, v)


def _attend(
    shape: StreamShape,
    sharded: bool,
    scale: float | None,  # None: 1/sqrt(head_dim)
    softcap: float | None,
    a: dict[str, jax.Array],
) -> jax.Array:
    """Block attention of one layer on whatever heads `a` holds (all, or one device's)."""
    meta = BlockMeta(a["prefix"], a["own"], a["local_start"], a.get("pos"))
    q, k, v, pool_k, pool_v = (a[n] for n in ("q", "k", "v", "pool_k", "pool_v"))
    kw = {} if scale is None and softcap is None else {"scale": scale, "softcap": softcap}
    if "window" in a:
        kw["window"] = a["window"]
    match shape.attention:
        case Attention.XLA:
            return block_attention(
                q,
                k,
                v,
                pool_k,
                pool_v,
                meta,
                block=shape.block,
                tile=shape.tile,
                key_tiles=shape.key_tiles,
                **kw,
            )
        case Attention.PALLAS:
            # Simulated CPU devices under shard_map: the TPU interpreter's callbacks block
            # XLA:CPU's device threads (4 devices on 2 cores hang), the generic one has none.
            backend = "gpu" if sharded and jax.default_backend() == "cpu" else None
            return ragged_block_attention(
                q,
                k,
                v,
                pool_k,
                pool_v,
                meta,
                block=shape.block,
                backend=backend,
                **kw,
            )
        case Attention.DENSE:
            return dense_attention(q, k, v, meta, block=shape.block, **kw)
    raise ValueError(f"unresolved attention {shape.attention}")


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, lora=None):
        def dense(feats, name):
            layer = nn.Dense(
                feats, use_bias=False, name=name, dtype=self.dtype, param_dtype=self.dtype
            )
            return lambda h: _plus(layer(h), lora_delta(h, lora, name, (feats,)))

        gate = dense(self.cfg.intermediate_size, "gate_proj")(x)
        up = dense(self.cfg.intermediate_size, "up_proj")(x)
        return dense(self.cfg.hidden_size, "down_proj")(activation(self.cfg.activation, gate) * up)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP gate's activation, by its HF name."""
    match name:
        case "silu":
            return nn.silu(x)
        case "gelu_pytorch_tanh":
            return jax.nn.gelu(x, approximate=True)
        case "gelu":
            return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"activation {name!r} is not supported")


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    shape: StreamShape
    dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, per_layer, cos, sin, meta, adapters=None):
        """per_layer: this layer's (pool_k, pool_v), then its RoPE table's index when the model
        has two (Gemma 3: cos/sin [2, T, D], sliding layers read table 1), then its window when
        the model has windowed layers (models/config.py: layer_windows), then its LoRA weights
        when the stream has adapters (`adapters`: (block_slot, any), Lora)."""
        cfg = self.cfg
        norm = partial(RMSNorm, cfg.rms_norm_eps, self.dtype, cfg.norm_offset)
        pool_k, pool_v, *rest = per_layer
        if cfg.layer_rope:
            table, *rest = rest
            cos, sin = cos[table], sin[table]
        window = rest.pop(0) if cfg.layer_windows else None
        lora = None if adapters is None else Lora(rest[0], *adapters)
        h = norm(name="input_layernorm")(x)
        a, kv = SelfAttention(cfg, self.shape, self.dtype, self.mesh, name="self_attn")(
            h, cos, sin, meta, pool_k, pool_v, window, lora
        )
        if cfg.sandwich_norms:  # Gemma 2/3: the attention output is normed before the residual
            a = norm(name="post_attention_layernorm")(a)
        x = x + a
        with jax.named_scope("mlp"):
            # Gemma 2/3 call the pre-MLP norm pre_feedforward_layernorm and norm the MLP's
            # output too; the others call it post_attention_layernorm.
            pre = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
            h = MLP(cfg, self.dtype, name="mlp")(norm(name=pre)(x), lora)
            if cfg.sandwich_norms:
                h = norm(name="post_feedforward_layernorm")(h)
            x = x + h
        return x, kv


class Decoder(nn.Module):
    """The decoder (`body`) and the head at chosen positions (`head`: LM or classification);
    `__call__` runs both (it is what `init` traces)."""

    cfg: ModelConfig
    shape: StreamShape
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None  # tensor parallel over this mesh (models/parallel.py)

    def setup(self) -> None:
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype
        )
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.shape, self.dtype, self.mesh)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset)
        if cfg.head is Head.CLASSIFICATION:  # HF `score`: Linear(hidden, num_labels, bias=False)
            self.score = self.param(
                "score", nn.initializers.normal(), (cfg.num_labels, cfg.hidden_size), self.dtype
            )
        elif not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.initializers.normal(), (cfg.vocab_size, cfg.hidden_size), self.dtype
            )

    def body(
        self,
        tokens: jax.Array,  # [T] int32
        pos: jax.Array,  # [T] int32 RoPE positions
        meta: BlockMeta,
        pool_k: jax.Array,  # [layers, kv_heads, P, head_dim]
        pool_v: jax.Array,
        lora: Lora | None = None,  # weights [layers, slots, ...] per module
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # [T, hidden]; K, V [layers, T, K, D]
        cfg = self.cfg
        x = self.embed_tokens(tokens)
        if cfg.embed_scale:  # HF Gemma: embeddings * tensor(sqrt(hidden)).to(dtype)
            x = x * jnp.asarray(np.float32(cfg.hidden_size**0.5), self.dtype)
        cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        per_layer: tuple[jax.Array, ...] = (pool_k, pool_v)
        if cfg.layer_rope:  # Gemma 3: the sliding layers' own RoPE base
            local = rope_tables(pos, cfg.head_dim, cfg.local_rope_theta)
            cos, sin = jnp.stack([cos, local[0]]), jnp.stack([sin, local[1]])
            per_layer += (jnp.asarray(cfg.layer_rope, jnp.int32),)
        if cfg.layer_windows:  # sliding windows: per layer, over the tokens' positions
            per_layer += (jnp.asarray(cfg.layer_windows, jnp.int32),)
            meta = dataclasses.replace(meta, pos=pos)
        adapters = None
        if lora is not None:
            per_layer += (lora.weights,)
            adapters = (lora.block_slot, lora.any)
        if self.is_initializing():  # nn.scan makes the parameters, stacked over the layers
            return self.layers(x, per_layer, cos, sin, meta, adapters)
        # Applied: the same layer in a plain lax.scan over those stacked parameters. nn.scan
        # traces its body twice (once more to find what it broadcasts), and tracing a layer
        # is most of what building a body program costs, a compilation-cache hit included.
        layer = DecoderLayer(cfg, self.shape, self.dtype, self.mesh, parent=None)

        def step(x, xs):
            params, per = xs
            return layer.apply({"params": params}, x, per, cos, sin, meta, adapters)

        return jax.lax.scan(step, x, (self.variables["params"]["layers"], per_layer))

    def head(
        self,
        hidden: jax.Array,  # [T, hidden]
        score_idx: jax.Array,  # [S] int32: stream index whose next-token logits are scored
        label_ids: jax.Array,  # [U] int32 (LM head; a classification head reads none)
        heads: tuple[jax.Array, jax.Array] | None = None,  # adapters' own classification heads
    ) -> tuple[jax.Array, ...]:  # LM: label logits [S, U] f32, log-sum-exp [S] f32 (and with
        # `heads`, the class logits [S, classes] f32 of rows an adapter's head scores);
        # classification: class logits [S, classes] f32, zeros [S]
        if self.cfg.head is Head.CLASSIFICATION:
            with jax.named_scope("score"):
                # HF: score(hidden) pooled at the sequence's last token, no soft-cap.
                h = self.norm(jnp.take(hidden, score_idx, axis=0))
                logits = jnp.einsum("sd,cd->sc", h, self.score, preferred_element_type=jnp.float32)
                if heads is not None:
                    logits = adapter_heads(h, logits, *heads)
                return logits, jnp.zeros(h.shape[:1], jnp.float32)
        with jax.named_scope("lm_head"):
            h = self.norm(jnp.take(hidden, score_idx, axis=0))
            w = self.embed_tokens.embedding if self.cfg.tie_word_embeddings else self.lm_head
            out = label_logits_and_lse(h, w, label_ids, self.cfg.final_softcap)
        if heads is None:
            return out
        with jax.named_scope("score"):  # adapters turning the LM into a classifier
            return (*out, adapter_heads(h, jnp.zeros((h.shape[0], 0), jnp.float32), *heads))

    def __call__(self, tokens, pos, meta, pool_k, pool_v, score_idx, label_ids):
        hidden, _ = self.body(tokens, pos, meta, pool_k, pool_v)
        return self.head(hidden, score_idx, label_ids)


def adapter_heads(
    h: jax.Array,  # [S, hidden], normed
    base: jax.Array,  # [S, num_labels] f32: the base's head on every row
    stack: jax.Array,  # [slots, classes, hidden]: each slot's adapter head (zeros: none)
    row_slot: jax.Array,  # [S] int32: the slot whose head scores the row (0: the base's)
) -> jax.Array:  # [S, classes] f32, the base's rows padded with zeros past num_labels
    """Class logits of rows scored by adapters' own heads (peft's modules_to_save `score`),
    maybe with another number of classes than the base's. Every slot's head runs on every
    row and each row takes its own: a row's logits are one product of its hidden state and
    its head, whatever the other rows' adapters (bit for bit), and the base's rows keep the
    base's product untouched."""
    per_slot = jnp.einsum("sd,ncd->nsc", h, stack, preferred_element_type=jnp.float32)
    own = jnp.take_along_axis(per_slot, row_slot[None, :, None], axis=0)[0]
    base = jnp.pad(base, ((0, 0), (0, stack.shape[1] - base.shape[1])))
    return jnp.where((row_slot > 0)[:, None], own, base)


def vocab_blocks(vocab: int, target: int = 8192, smallest: int = 1024) -> int:
    """Number of equal vocab blocks for the LM head: the fewest of at most `target` rows each,
    1 when the vocab has no divisor giving blocks of >= `smallest` rows."""
    for n in range(-(-vocab // target), vocab // smallest + 1):
        if vocab % n == 0:
            return n
    return 1


def label_logits_and_lse(
    h: jax.Array,  # [S, hidden]
    head: jax.Array,  # [vocab, hidden] (HF layout of the LM head / tied embedding)
    label_ids: jax.Array,  # [U] int32
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:  # [S, U] f32, [S] f32
    """Label logits and the log-sum-exp over the whole vocab, without writing out the
    [S, vocab] logits: the vocab is walked in blocks with a running max and sum (a 150k-wide
    logit array cost more to write and re-read than its matmul on the CPU). `softcap` (Gemma
    2's final_logit_softcapping): every logit becomes tanh(logit / cap) * cap, as HF applies it
    before any softmax, so the running max and sum see capped logits too."""

    def cap(logits):
        return logits if softcap is None else jnp.tanh(logits / softcap) * softcap

    vocab, hidden = head.shape
    n = vocab_blocks(vocab)
    ones = jnp.ones((vocab // n,), jnp.float32)

    def block(w):
        logits = cap(jnp.einsum("sd,vd->sv", h, w, preferred_element_type=jnp.float32))
        m = logits.max(axis=-1)
        # A dot, not a reduce: its per-row bits do not depend on how many rows there are.
        return m, jnp.einsum("sv,v->s", jnp.exp(logits - m[..., None]), ones)

    m, sums = jax.lax.map(block, head.reshape(n, vocab // n, hidden))  # [n, S] each
    top = m.max(axis=0)
    # A dot with ones again: as "ns,ns->s" XLA:CPU lowered it like a reduce, and 5 of 64
    # rows' bits changed with the number of rows (64 vs 128-512 score positions).
    lse = top + jnp.log(jnp.einsum("ns,n->s", sums * jnp.exp(m - top), jnp.ones((n,), sums.dtype)))
    labels = jnp.take(head, label_ids, axis=0)  # [U, hidden]
    label_logits = cap(jnp.einsum("sd,ud->su", h, labels, preferred_element_type=jnp.float32))
    return label_logits, lse


def init_shape(block: int = 8) -> StreamShape:
    """The smallest stream shape: what `init` and shape inspection trace."""
    return StreamShape(block, block, block, Attention.XLA, key_tiles=(8, 8))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter path ("layers/mlp/up_proj/kernel") -> shape, from the model itself."""
    shape = init_shape()
    model = Decoder(cfg, shape)
    ints = jnp.zeros((shape.tokens,), jnp.int32)
    meta = BlockMeta(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 4), jnp.int32), ints)  # 1 block
    pool = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, 16, cfg.head_dim))  # [layers, K, P, D]
    tree = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ints, ints, meta, pool, pool, ints[:1], ints[:2])
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
