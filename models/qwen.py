"""Qwen3 and Qwen2/Qwen2.5 decoders in Flax, shaped for multi-item scoring.

A forward is two programs. `body` runs a flat stream of T tokens, cut into blocks (the mask
and its metadata: kernels/block_attention.py), through the layers and returns the hidden states
and each layer's K/V (the engine writes a query's K/V into its pool). `head` runs the LM head at
the score positions only. So the stream's length and the number of scores are two separate short
ladders of compiled shapes, not a product. Layers are stacked with `nn.scan` so compile time
does not grow with depth. Numerics follow HF transformers: RMSNorm and softmax in float32,
RoPE with rotate-half and float32 angles.
"""

from __future__ import annotations

import dataclasses
import enum
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kernels.block_attention import BlockMeta, block_attention, dense_attention
from kernels.ragged_attention import ragged_block_attention
from models.config import ModelConfig
from models.parallel import over_heads


class Attention(enum.Enum):
    """Who computes block attention: one choice per deployment, resolved once at start."""

    AUTO = "auto"  # the engine picks (models/engine.py: resolve_attention)
    XLA = "xla"  # tiled flash attention in XLA ops (kernels/block_attention.py)
    PALLAS = "pallas"  # the Pallas kernel: TPU Mosaic / GPU Triton (kernels/ragged_attention.py)
    DENSE = "dense"  # the materialised [T, T] mask baseline (packed mode, no pool)


@dataclasses.dataclass(frozen=True)
class StreamShape:
    """Static shape of one forward's stream: `tokens` tokens in blocks of `block`."""

    tokens: int
    block: int
    attention: Attention
    key_tiles: tuple[int, int] = (512, 128)  # XLA: big and small key tiles of a range

    def __post_init__(self) -> None:
        if self.attention is Attention.AUTO:
            raise ValueError("resolve attention 'auto' before building a stream shape")
        if self.tokens % self.block:
            raise ValueError(f"{self.tokens=} must be a multiple of {self.block=}")


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        # Mean square as a dot, not a fused reduce: XLA:CPU's reduce+rsqrt fusion rounds
        # differently for different row counts, which would let one item's length change
        # another item's score in the last bit (isolation must be exact).
        inv_d = jnp.full((x.shape[-1],), 1.0 / x.shape[-1], jnp.float32)
        mean_sq = jnp.einsum("...d,d->...", x32 * x32, inv_d)[..., None]
        y = x32 * jax.lax.rsqrt(mean_sq + self.eps)
        return scale * y.astype(x.dtype)  # HF: weight * hidden.to(input_dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
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
    return np.float32(1.0) / power


def rope_tables(pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., head_dim] for RoPE positions `pos` (float32, as HF computes them)."""
    freqs = pos.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    cfg: ModelConfig
    shape: StreamShape
    dtype: jnp.dtype
    mesh: Mesh | None = None  # tensor parallel: attention runs per device's heads

    @nn.compact
    def __call__(self, x, cos, sin, meta: BlockMeta, pool_k, pool_v):
        cfg = self.cfg
        dense = lambda feats, bias, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=bias, name=name, dtype=self.dtype, param_dtype=self.dtype
        )
        with jax.named_scope("qkv"):
            q = dense((cfg.num_heads, cfg.head_dim), cfg.qkv_bias, "q_proj")(x)  # [T, H, D]
            k = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "k_proj")(x)  # [T, K, D]
            v = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "v_proj")(x)
            if cfg.qk_norm:
                q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
                k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        t = x.shape[0]
        arrays = {
            "q": q.reshape(t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim),
            "k": k,
            "v": v,
            "pool_k": pool_k,
            "pool_v": pool_v,
            "ranges": meta.ranges,
            "local_start": meta.local_start,
        }
        with jax.named_scope("attention"):
            heads = {"q": 1, "k": 1, "v": 1, "pool_k": 0, "pool_v": 0}  # their head axes
            attend = partial(_attend, self.shape, self.mesh is not None)
            o = over_heads(attend, self.mesh, heads)(arrays)
        o = o.reshape(t, cfg.num_heads, cfg.head_dim)
        return dense(cfg.hidden_size, cfg.o_bias, "o_proj", axis=(-2, -1))(o), (k, v)


def _attend(shape: StreamShape, sharded: bool, a: dict[str, jax.Array]) -> jax.Array:
    """Block attention of one layer on whatever heads `a` holds (all, or one device's)."""
    meta = BlockMeta(a["ranges"], a["local_start"])
    q, k, v, pool_k, pool_v = (a[n] for n in ("q", "k", "v", "pool_k", "pool_v"))
    match shape.attention:
        case Attention.XLA:
            return block_attention(
                q, k, v, pool_k, pool_v, meta, block=shape.block, key_tiles=shape.key_tiles
            )
        case Attention.PALLAS:
            # Simulated CPU devices under shard_map: the TPU interpreter's callbacks block
            # XLA:CPU's device threads (4 devices on 2 cores hang), the generic one has none.
            backend = "gpu" if sharded and jax.default_backend() == "cpu" else None
            return ragged_block_attention(
                q, k, v, pool_k, pool_v, meta, block=shape.block, backend=backend
            )
        case Attention.DENSE:
            return dense_attention(q, k, v, meta, block=shape.block)
    raise ValueError(f"unresolved attention {shape.attention}")


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, use_bias=False, name=name, dtype=self.dtype, param_dtype=self.dtype
        )
        gate = dense(self.cfg.intermediate_size, "gate_proj")(x)
        up = dense(self.cfg.intermediate_size, "up_proj")(x)
        return dense(self.cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    shape: StreamShape
    dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, pool_kv, cos, sin, meta):
        eps = self.cfg.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        a, kv = SelfAttention(self.cfg, self.shape, self.dtype, self.mesh, name="self_attn")(
            h, cos, sin, meta, *pool_kv
        )
        x = x + a
        with jax.named_scope("mlp"):
            h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
            x = x + MLP(self.cfg, self.dtype, name="mlp")(h)
        return x, kv


class Qwen(nn.Module):
    """The decoder (`body`) and the LM head at chosen positions (`head`); `__call__` runs both
    (it is what `init` traces)."""

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
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.shape, self.dtype, self.mesh)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)
        if not cfg.tie_word_embeddings:
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
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # [T, hidden]; K, V [layers, T, K, D]
        x = self.embed_tokens(tokens)
        cos, sin = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)
        return self.layers(x, (pool_k, pool_v), cos, sin, meta)

    def head(
        self,
        hidden: jax.Array,  # [T, hidden]
        score_idx: jax.Array,  # [S] int32: stream index whose next-token logits are scored
        label_ids: jax.Array,  # [U] int32
    ) -> tuple[jax.Array, jax.Array]:  # label logits [S, U] f32, log-sum-exp [S] f32
        with jax.named_scope("lm_head"):
            h = self.norm(jnp.take(hidden, score_idx, axis=0))
            w = self.embed_tokens.embedding if self.cfg.tie_word_embeddings else self.lm_head
            return label_logits_and_lse(h, w, label_ids)

    def __call__(self, tokens, pos, meta, pool_k, pool_v, score_idx, label_ids):
        hidden, _ = self.body(tokens, pos, meta, pool_k, pool_v)
        return self.head(hidden, score_idx, label_ids)


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
) -> tuple[jax.Array, jax.Array]:  # [S, U] f32, [S] f32
    """Label logits and the log-sum-exp over the whole vocab, without writing out the
    [S, vocab] logits: the vocab is walked in blocks with a running max and sum (a 150k-wide
    logit array cost more to write and re-read than its matmul on the CPU)."""
    vocab, hidden = head.shape
    n = vocab_blocks(vocab)
    ones = jnp.ones((vocab // n,), jnp.float32)

    def block(w):
        logits = jnp.einsum("sd,vd->sv", h, w, preferred_element_type=jnp.float32)
        m = logits.max(axis=-1)
        # A dot, not a reduce: its per-row bits do not depend on how many rows there are.
        return m, jnp.einsum("sv,v->s", jnp.exp(logits - m[..., None]), ones)

    m, sums = jax.lax.map(block, head.reshape(n, vocab // n, hidden))  # [n, S] each
    top = m.max(axis=0)
    # A dot with ones again: as "ns,ns->s" XLA:CPU lowered it like a reduce, and 5 of 64
    # rows' bits changed with the number of rows (64 vs 128-512 score positions).
    lse = top + jnp.log(jnp.einsum("ns,n->s", sums * jnp.exp(m - top), jnp.ones((n,), sums.dtype)))
    labels = jnp.take(head, label_ids, axis=0)  # [U, hidden]
    label_logits = jnp.einsum("sd,ud->su", h, labels, preferred_element_type=jnp.float32)
    return label_logits, lse


def init_shape(block: int = 8) -> StreamShape:
    """The smallest stream shape: what `init` and shape inspection trace."""
    return StreamShape(tokens=block, block=block, attention=Attention.XLA, key_tiles=(8, 8))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter path ("layers/mlp/up_proj/kernel") -> shape, from the model itself."""
    shape = init_shape()
    model = Qwen(cfg, shape)
    ints = jnp.zeros((shape.tokens,), jnp.int32)
    meta = BlockMeta(jnp.zeros((1, 4), jnp.int32), ints)
    pool = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, 16, cfg.head_dim))  # [layers, K, P, D]
    tree = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ints, ints, meta, pool, pool, ints[:1], ints[:2])
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
