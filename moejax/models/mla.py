"""Multi-head Latent Attention (MLA; DeepSeek-AI, 2024, "DeepSeek-V2", Sec. 2.1), causal.

  q = RMSNorm(x W_qa) W_qb (q_lora_rank > 0) or x W_q        [B, L, H, D_n + D_r]
  [c, k_r] = x W_kva;  [k_n, v] = RMSNorm(c) W_kvb            [B, L, H, D_n + D_v]
  out = softmax((q_n . k_n + RoPE(q_r) . RoPE(k_r)) / sqrt(D_n + D_r) + causal) v W_o

k_r [B, L, D_r] is one key shared by the heads (decoupled, interleaved RoPE), so a KV cache
holds only c [r_kv] and k_r. Latent norms use eps 1e-6 (``LATENT_NORM_EPS``) as HF's
``DeepseekV2Attention``; params are its Linears transposed (``moejax.convert.hf_deepseek``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention import Projection
from moejax.models.attention_impl import attend, causal_mask, resolve_impl
from moejax.models.kv_cache import DecodeStep, update_cache
from moejax.models.norms import rms_norm
from moejax.models.rope import apply_rope_interleaved

LATENT_NORM_EPS = 1e-6


class LatentRMSNorm(nn.Module):
  """RMSNorm over a latent axis: parameter ``scale`` [r] with logical name `axis_name`."""

  axis_name: str
  eps: float = LATENT_NORM_EPS
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    return rms_norm(x, scale, self.eps).astype(self.dtype)


def mla_attention(
  q_nope: jax.Array,
  q_rope: jax.Array,
  k_nope: jax.Array,
  k_rope: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  scale: float,
) -> jax.Array:
  """Masked softmax attention with a RoPE key shared by all heads.

  q_nope: [B, L, H, D_n]; q_rope: [B, L, H, D_r]; k_nope: [B, M, H, D_n];
  k_rope: [B, M, D_r]; v: [B, M, H, D_v]; mask: bool [L, M] -> [B, L, H, D_v].
  scores = (q_nope . k_nope + q_rope . k_rope) * scale, float32.
  """
  scores = jnp.einsum(
    "blhk,bmhk->bhlm", q_nope, k_nope, preferred_element_type=jnp.float32
  ) + jnp.einsum("blhk,bmk->bhlm", q_rope, k_rope, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * jnp.float32(scale)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhlm,bmhk->blhk", probs, v)


class MLAttention(nn.Module):
  """Causal MLA self-attention: ``y = MLAttention(...)(x, cos, sin)``, x [B, L, d];
  cos, sin: [L, D_r / 2] from ``interleaved_rope_angles(positions, D_r, theta)``.

  With ``decode`` (``moejax.models.kv_cache.DecodeStep``) the cache holds only the
  compressed latent c_kv [B, M, r_kv] and the shared RoPE key k_r [B, M, D_r]; k_n and v
  are re-expanded from c_kv (``kv_b``) over the M cached slots.
  """

  num_heads: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  q_lora_rank: int = 0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "reference"  # the kernel, ``moejax.models.attention_impl``
  softmax_scale: float | None = None  # None: (D_n + D_r)^-1/2 (YaRN multiplies it)

  @nn.compact
  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, decode: DecodeStep | None = None
  ) -> jax.Array:
    d = x.shape[-1]
    h, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    rq, rkv = self.q_lora_rank, self.kv_lora_rank
    proj = lambda shape, names, eq, name, in_axes=(0,): Projection(
      shape, names, eq, in_axes, self.dtype, self.param_dtype, name=name
    )
    norm = lambda axis, name: LatentRMSNorm(
      axis, LATENT_NORM_EPS, self.dtype, self.param_dtype, name=name
    )

    if rq:
      c_q = proj((d, rq), ("embed", "q_lora"), "bld,dr->blr", "q_a")(x)
      c_q = norm("q_lora", "q_norm")(c_q)
      q = proj((rq, h, dn + dr), ("q_lora", "heads", "head_dim"), "blr,rhk->blhk", "q_b")(c_q)
    else:
      q = proj((d, h, dn + dr), ("embed", "heads", "head_dim"), "bld,dhk->blhk", "q")(x)
    q_nope, q_rope = q[..., :dn], apply_rope_interleaved(q[..., dn:], cos, sin)

    kv_a = proj((d, rkv + dr), ("embed", "kv_lora"), "bld,dr->blr", "kv_a")(x)
    c_kv = norm("kv_lora", "kv_norm")(kv_a[..., :rkv])  # [B, L, r_kv]
    k_rope = apply_rope_interleaved(kv_a[..., None, rkv:], cos, sin)[..., 0, :]  # [B, L, D_r]
    if decode is not None:  # [B, M, r_kv], [B, M, D_r]
      c_kv = update_cache(self, "latent", c_kv, decode)
      k_rope = update_cache(self, "rope_key", k_rope, decode)
    kv = proj((rkv, h, dn + dv), ("kv_lora", "heads", "head_dim"), "blr,rhk->blhk", "kv_b")(c_kv)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    scale = (dn + dr) ** -0.5 if self.softmax_scale is None else self.softmax_scale
    if decode is not None:  # mask [B, L, M] -> [B, 1, L, M] over [b, h, l, m]
      out = mla_attention(q_nope, q_rope, k_nope, k_rope, v, decode.mask[:, None], scale)
    elif resolve_impl(self.impl, x.shape[1]) == "reference":
      out = mla_attention(q_nope, q_rope, k_nope, k_rope, v, causal_mask(x.shape[1]), scale)
    else:  # one key per head: [k_n | k_r], the shared k_r broadcast over the H heads
      k = jnp.concatenate(
        [
          k_nope,
          jnp.broadcast_to(k_rope[:, :, None, :].astype(k_nope.dtype), k_nope.shape[:3] + (dr,)),
        ],
        axis=-1,
      )
      q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
      out = attend(q, k, v, scale, self.impl)
    return proj((h, dv, d), ("heads", "head_dim", "embed"), "blhk,hkd->bld", "o", (0, 1))(out)
