"""Rotary position embeddings (Su et al., 2021, RoFormer) and YaRN (Peng et al., 2023).

With inv_freq_i = theta^(-2i / D_h): the "rotate_half" layout (HF Llama/Mixtral) rotates
the pairs (x_i, x_{i + D_h/2}), RoPE(x) = x cos(a) + rotate_half(x) sin(a) with
a = [p inv_freq, p inv_freq]; the interleaved layout (the paper's, HF DeepSeek-V2's)
rotates x_{2i} + i x_{2i+1} by exp(i p inv_freq_i). ``yarn_rope_angles`` extends the
interleaved (MLA) RoPE as transformers' DeepSeek-V2/V3 do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """positions: int [..., L] -> (cos, sin) float32 [..., L, head_dim]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., L, D_h/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [..., L, D_h]
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] on the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, L, heads, D_h]; cos, sin: [L, D_h] (or [B, L, D_h]). Computed in float32,
  returned in x's dtype."""
  cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def interleaved_rope_angles(
  positions: jax.Array, dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """positions: int [..., L] -> (cos, sin) float32 [..., L, dim/2] of p * inv_freq_i,
  inv_freq_i = theta^(-2i / dim) (one angle per rotated pair)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., L, dim/2]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (x_{2i}, x_{2i+1}). x: [B, L, heads, D]; cos, sin: [L, D/2] (or
  [B, L, D/2]). Computed in float32, returned in x's dtype."""
  cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  re, im = xf[..., 0], xf[..., 1]  # [B, L, heads, D/2]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude scale (Peng et al., 2023, eq. 21/22 as DeepSeek writes it):
  0.1 * mscale * ln(s) + 1 for s > 1, else 1."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
  """The factor cos/sin are multiplied by: mscale(s, mscale) / mscale(s, mscale_all_dim)
  when both are non-zero, else mscale(s) (transformers' ``_compute_yarn_parameters``)."""
  if mscale and mscale_all_dim:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
  return yarn_mscale(factor)


def yarn_softmax_multiplier(factor: float, mscale_all_dim: float) -> float:
  """DeepSeek's extra softmax-scale factor mscale(s, mscale_all_dim)^2 (1 when
  mscale_all_dim = 0)."""
  return yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0


def yarn_inv_freq(
  dim: int,
  theta: float,
  factor: float,
  original_max_len: int,
  beta_fast: float,
  beta_slow: float,
) -> jax.Array:
  """YaRN "NTK-by-parts" frequencies (Peng et al., 2023, sec. 3.2) -> float32 [dim / 2].

  Dimension pair i has wavelength 2 pi / inv_freq_i; over the original context L it makes
  r = L inv_freq_i / (2 pi) rotations. The pair index making r rotations is
  d(r) = dim ln(L / (2 pi r)) / (2 ln theta); with low = floor(d(beta_fast)) and
  high = ceil(d(beta_slow)) (clipped to [0, dim - 1]) and the ramp
  gamma_i = clip((i - low) / (high - low), 0, 1),
    inv_freq'_i = inv_freq_i / s * gamma_i + inv_freq_i * (1 - gamma_i):
  fast pairs (i < low) keep inv_freq_i, slow pairs (i > high) are interpolated by 1 / s.
  """

  def pair_index(rotations: float) -> float:
    return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(pair_index(beta_fast)), 0)
  high = min(math.ceil(pair_index(beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoid dividing by zero
  pos_freqs = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim / 2]
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  return 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * extrapolation


def yarn_rope_angles(
  positions: jax.Array,
  dim: int,
  theta: float,
  factor: float,
  original_max_len: int,
  beta_fast: float,
  beta_slow: float,
  mscale: float,
  mscale_all_dim: float,
) -> tuple[jax.Array, jax.Array]:
  """Interleaved-layout YaRN: positions int [..., L] -> (cos, sin) float32 [..., L, dim/2]
  of p * inv_freq'_i (``yarn_inv_freq``), both times ``yarn_attention_factor``."""
  inv_freq = yarn_inv_freq(dim, theta, factor, original_max_len, beta_fast, beta_slow)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., L, dim/2]
  attn_factor = jnp.float32(yarn_attention_factor(factor, mscale, mscale_all_dim))
  return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor
