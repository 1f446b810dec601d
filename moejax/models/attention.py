"""Causal grouped-query self-attention with rotary embeddings (GQA; Ainslie et al., 2023).

  q = RoPE(x W_q) [B, L, H, D_h];  k = RoPE(x W_k), v = x W_v  [B, L, H_kv, D_h]
  out = softmax_m(q_h . k_{j(h)} / sqrt(D_h) + causal) v_{j(h)} W_o  [B, L, d]

Query head h = j * G + r reads kv head j (G = H / H_kv; HF's ``repeat_kv`` order); the
kernel is ``impl`` (``moejax.models.attention_impl``). Options: ``qk_norm`` 'head' or
'projection' (RMSNorm of q, k before RoPE; Qwen3 / OLMoE), ``clip_qkv`` (OLMoE),
``qkv_bias`` (Qwen2).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention_impl import attend, causal_mask, gqa_attention  # noqa: F401
from moejax.models.kv_cache import DecodeStep, update_cache
from moejax.models.norms import rms_norm
from moejax.models.rope import apply_rope


def fan_in_init(in_axes: Sequence[int], out_axes: Sequence[int]):
  """Truncated-normal variance scaling with Var = 1 / prod(shape[in_axes])."""
  return nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=tuple(out_axes)
  )


class Projection(nn.Module):
  """``y = einsum(equation, x, kernel)``: a bias-free linear map with a named kernel.

  Attributes:
    shape: kernel shape; names: its logical axis names; in_axes: the kernel axes that are
    contracted with x (their product is the fan-in of the init).
  """

  shape: tuple[int, ...]
  names: tuple[str, ...]
  equation: str
  in_axes: tuple[int, ...] = (0,)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  use_bias: bool = False  # + bias over the output axes (Qwen2's q/k/v biases), init 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_axes = tuple(i for i in range(len(self.shape)) if i not in self.in_axes)
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(fan_in_init(self.in_axes, out_axes), self.names),
      self.shape,
      self.param_dtype,
    )
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      out_shape = tuple(self.shape[i] for i in out_axes)
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.names[i] for i in out_axes)),
        out_shape,
        self.param_dtype,
      )
      y = y + bias.astype(y.dtype)
    return y


class Attention(nn.Module):
  """Causal GQA self-attention: ``y = Attention(...)(x, cos, sin)``, x [B, L, d].

  With ``decode`` (a ``moejax.models.kv_cache.DecodeStep``) k and v [B, M, H_kv, D_h] come
  from the layer's KV cache after writing this call's rows, masked by ``decode.mask``.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "reference"  # the kernel, ``moejax.models.attention_impl.attend``
  qk_norm: str = "none"  # 'none' | 'head' | 'projection' (module docstring)
  clip_qkv: float | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)

  @nn.compact
  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, decode: DecodeStep | None = None
  ) -> jax.Array:
    d = x.shape[-1]
    h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    proj = lambda shape, names, eq, name, in_axes=(0,), bias=False: Projection(
      shape, names, eq, in_axes, self.dtype, self.param_dtype, bias, name=name
    )
    b = self.qkv_bias
    q = proj((d, h, dh), ("embed", "heads", "head_dim"), "bld,dhk->blhk", "q", bias=b)(x)
    k = proj((d, hkv, dh), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk", "k", bias=b)(x)
    v = proj((d, hkv, dh), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk", "v", bias=b)(x)
    if self.qk_norm != "none":
      q, k = self._norm(q, "q_norm"), self._norm(k, "k_norm")
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if decode is None:
      out = attend(q, k, v, None, self.impl)
    else:  # k, v: [B, M, H_kv, D_h]; mask [B, L, M] -> [B, 1, 1, L, M] over [b, j, r, l, m]
      k, v = update_cache(self, "key", k, decode), update_cache(self, "value", v, decode)
      out = gqa_attention(q, k, v, decode.mask[:, None, None])
    return proj((h, dh, d), ("heads", "head_dim", "embed"), "blhk,hkd->bld", "o", (0, 1))(out)

  def _norm(self, x: jax.Array, name: str) -> jax.Array:
    """RMSNorm of x [B, L, heads, D_h] over D_h ('head') or heads * D_h ('projection')."""
    b, l, heads, dh = x.shape
    width, names = (dh, ("head_dim",)) if self.qk_norm == "head" else (heads * dh, (None,))
    scale = self.param(
      name + "_scale",
      nn.with_logical_partitioning(nn.initializers.ones, names),
      (width,),
      self.param_dtype,
    )
    flat = x if self.qk_norm == "head" else x.reshape(b, l, 1, heads * dh)
    return rms_norm(flat, scale, self.norm_eps).reshape(x.shape).astype(x.dtype)
