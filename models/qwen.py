"""Qwen3 and Qwen2/Qwen2.5 decoders in Flax, shaped for multi-item scoring.

One model serves every scoring mode: the token stream layout (`StreamLayout`) and the
attention implementation are static, the per-token metadata (`pos`, `item_off`) and the prefix
KV are traced inputs. Layers are stacked with `nn.scan` so compile time does not grow with depth.
Numerics follow HF transformers: RMSNorm and softmax in float32, RoPE with rotate-half.
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

from kernels.ragged_attention import stream_segment_attention
from kernels.segment_attention import dense_mask_attention, segment_attention
from models.config import ModelConfig
from models.parallel import over_heads


class AttentionImpl(enum.Enum):
    SEGMENT = "segment"  # mask computed from O(T) metadata inside the kernel
    DENSE = "dense"  # materialised [B, T, T] mask from the host
    PALLAS = "pallas"  # the segment mask in the Pallas ragged kernel (kernels/ragged_attention.py)


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Static shape of a token stream: `head_len` head tokens, then `num_slots` x `slot_len`."""

    head_len: int
    num_slots: int = 0
    slot_len: int = 0
    attention: AttentionImpl = AttentionImpl.SEGMENT
    return_kv: bool = False  # return the head region's K/V per layer (prefill)

    @property
    def length(self) -> int:
        return self.head_len + self.num_slots * self.slot_len

    def __str__(self) -> str:
        kv = " +kv" if self.return_kv else ""
        return (
            f"head {self.head_len} + {self.num_slots}x{self.slot_len} slots, "
            f"{self.attention.value}{kv}"
        )


@dataclasses.dataclass(frozen=True)
class StreamMeta:
    """Traced per-token metadata; see kernels/segment_attention.py for the mask it implies."""

    pos: jax.Array  # [B, T] int32
    item_off: jax.Array  # [B, T] int32
    prefix_len: jax.Array  # [B] int32


jax.tree_util.register_dataclass(
    StreamMeta, data_fields=["pos", "item_off", "prefix_len"], meta_fields=[]
)


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
    """cos/sin [B, T, head_dim] for RoPE positions `pos` [B, T] (float32, as HF computes them)."""
    freqs = pos.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    cfg: ModelConfig
    layout: StreamLayout
    dtype: jnp.dtype
    mesh: Mesh | None = None  # tensor parallel: attention runs per device's heads

    @nn.compact
    def __call__(self, x, cos, sin, meta: StreamMeta, prefix_kv, dense_mask):
        cfg, lay = self.cfg, self.layout
        dense = lambda feats, bias, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=bias, name=name, dtype=self.dtype, param_dtype=self.dtype
        )
        with jax.named_scope("qkv"):
            q = dense((cfg.num_heads, cfg.head_dim), cfg.qkv_bias, "q_proj")(x)
            k = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "k_proj")(x)
            v = dense((cfg.num_kv_heads, cfg.head_dim), cfg.qkv_bias, "v_proj")(x)
            if cfg.qk_norm:
                q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
                k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b, t = x.shape[:2]
        qg = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
        head_kv = (k[:, : lay.head_len], v[:, : lay.head_len])
        arrays = {"q": qg, "k": k, "v": v, "item_off": meta.item_off, "prefix_len": meta.prefix_len}
        if prefix_kv is not None:
            arrays["pk"], arrays["pv"] = prefix_kv
        if lay.attention is AttentionImpl.DENSE:
            arrays["mask"] = dense_mask
        elif lay.attention is AttentionImpl.SEGMENT:
            arrays["pos"] = meta.pos
        with jax.named_scope("attention"):
            attend = over_heads(partial(_attend, lay), self.mesh, {"q", "k", "v", "pk", "pv"})
            o = attend(arrays)
        o = o.reshape(b, t, cfg.num_heads, cfg.head_dim)
        out = dense(cfg.hidden_size, cfg.o_bias, "o_proj", axis=(-2, -1))(o)
        return out, (head_kv if lay.return_kv else None)


def _attend(lay: StreamLayout, a: dict[str, jax.Array]) -> jax.Array:
    """Masked attention of one layer on whatever heads `a` holds (all, or one device's)."""
    prefix = (a["pk"], a["pv"]) if "pk" in a else None
    if lay.attention is AttentionImpl.DENSE:
        return dense_mask_attention(a["q"], a["k"], a["v"], a["mask"])
    if lay.attention is AttentionImpl.PALLAS:
        return stream_segment_attention(
            a["q"], a["k"], a["v"], prefix, a["item_off"], a["prefix_len"], head_len=lay.head_len
        )
    pk, pv = prefix or (a["k"][:, : lay.head_len], a["v"][:, : lay.head_len])
    return segment_attention(
        a["q"],
        a["k"],
        a["v"],
        pk,
        pv,
        a["pos"],
        a["item_off"],
        a["prefix_len"],
        head_len=lay.head_len,
        num_slots=lay.num_slots,
        slot_len=lay.slot_len,
    )


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
    layout: StreamLayout
    dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, prefix_kv, cos, sin, meta, dense_mask):
        eps = self.cfg.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        a, kv = Attention(self.cfg, self.layout, self.dtype, self.mesh, name="self_attn")(
            h, cos, sin, meta, prefix_kv, dense_mask
        )
        x = x + a
        with jax.named_scope("mlp"):
            h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
            x = x + MLP(self.cfg, self.dtype, name="mlp")(h)
        return x, kv


class QwenForScoring(nn.Module):
    """Decoder + LM head evaluated only at the score positions.

    Returns (label_logits [B, S, NL] f32, logsumexp over the full vocab [B, S] f32, kv) where
    kv is the head region's per-layer (K, V), each [layers, B, head_len, kv_heads, head_dim],
    when `layout.return_kv`, else None. With `score_idx=None` only kv is computed (prefill).
    """

    cfg: ModelConfig
    layout: StreamLayout
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None  # tensor parallel over this mesh (models/parallel.py)

    @nn.compact
    def __call__(
        self,
        tokens,  # [B, T] int32
        meta: StreamMeta,
        prefix_kv=None,  # (K, V) each [layers, B, P, kv_heads, head_dim], or None
        dense_mask=None,  # [B, T, T] bool for AttentionImpl.DENSE
        score_idx=None,  # [B, S] int32: stream index whose next-token logits are scored
        label_ids=None,  # [B, NL] int32
    ):
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            name="embed_tokens",
            dtype=self.dtype,
            param_dtype=self.dtype,
        )
        x = embed(tokens)
        cos, sin = rope_tables(meta.pos, cfg.head_dim, cfg.rope_theta)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )
        x, kv = layers(cfg, self.layout, self.dtype, self.mesh, name="layers")(
            x, prefix_kv, cos, sin, meta, dense_mask
        )
        if score_idx is None:
            return None, None, kv
        with jax.named_scope("lm_head"):
            h = jnp.take_along_axis(x, score_idx[..., None], axis=1)  # [B, S, hidden]
            h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(h)
            if cfg.tie_word_embeddings:
                head = embed.embedding
            else:
                head = self.param(
                    "lm_head",
                    nn.initializers.normal(),
                    (cfg.vocab_size, cfg.hidden_size),
                    self.dtype,
                )
            label_logits, lse = label_logits_and_lse(h, head, label_ids)
        return label_logits, lse, kv


def vocab_blocks(vocab: int, target: int = 8192, smallest: int = 1024) -> int:
    """Number of equal vocab blocks for the LM head: the fewest of at most `target` rows each,
    1 when the vocab has no divisor giving blocks of >= `smallest` rows."""
    for n in range(-(-vocab // target), vocab // smallest + 1):
        if vocab % n == 0:
            return n
    return 1


def label_logits_and_lse(
    h: jax.Array,  # [B, S, hidden]
    head: jax.Array,  # [vocab, hidden] (HF layout of the LM head / tied embedding)
    label_ids: jax.Array,  # [B, NL] int32
) -> tuple[jax.Array, jax.Array]:  # [B, S, NL] f32, [B, S] f32
    """Label logits and the log-sum-exp over the whole vocab, without writing out the
    [B, S, vocab] logits: the vocab is walked in blocks with a running max and sum (a
    150k-wide logit array cost more to write and re-read than its matmul on the CPU)."""
    vocab, hidden = head.shape
    n = vocab_blocks(vocab)
    ones = jnp.ones((vocab // n,), jnp.float32)

    def block(w):
        logits = jnp.einsum("bsd,vd->bsv", h, w, preferred_element_type=jnp.float32)
        m = logits.max(axis=-1)
        # A dot, not a reduce: its per-row bits do not depend on how many rows there are.
        return m, jnp.einsum("bsv,v->bs", jnp.exp(logits - m[..., None]), ones)

    m, sums = jax.lax.map(block, head.reshape(n, vocab // n, hidden))  # [n, B, S] each
    top = m.max(axis=0)
    lse = top + jnp.log(jnp.einsum("nbs,nbs->bs", sums, jnp.exp(m - top)))
    labels = jnp.take(head, label_ids, axis=0)  # [B, NL, hidden]
    label_logits = jnp.einsum("bsd,bnd->bsn", h, labels, preferred_element_type=jnp.float32)
    return label_logits, lse


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter path ("layers/mlp/up_proj/kernel") -> shape, from the model itself."""
    model = QwenForScoring(cfg, StreamLayout(head_len=1))
    one = jnp.zeros((1, 1), jnp.int32)
    meta = StreamMeta(pos=one, item_off=one, prefix_len=jnp.zeros((1,), jnp.int32))
    tree = jax.eval_shape(
        lambda: model.init(jax.random.key(0), one, meta, score_idx=one, label_ids=one)
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
