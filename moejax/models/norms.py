"""RMSNorm (Zhang & Sennrich, 2019), computed in float32 as in HF Llama/Mixtral.

RMSNorm(x) = x / sqrt(mean_i x_i^2 + eps) * scale,   scale initialised to 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x: [..., d], scale: [d] -> float32 [..., d]."""
  x = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * inv_rms * scale.astype(jnp.float32)


class RMSNorm(nn.Module):
  """``y = RMSNorm(eps, dtype)(x)``: parameter ``scale`` [d] ('embed',); output in `dtype`."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    return rms_norm(x, scale, self.eps).astype(self.dtype)
