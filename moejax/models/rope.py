"""Rotary position embeddings (Su et al., 2021, RoFormer) in the "rotate_half" layout of
HF Llama/Mixtral.

For head dimension D_h, frequencies inv_freq_i = theta^(-2i / D_h), i = 0..D_h/2-1, and
angles a = [p * inv_freq, p * inv_freq] (the half-size vector concatenated with itself):

  RoPE(x)_p = x * cos(a) + rotate_half(x) * sin(a),  rotate_half([x1, x2]) = [-x2, x1]

where x1, x2 are the first and second halves of the head dimension. (The paper rotates
interleaved pairs (x_{2i}, x_{2i+1}); this layout rotates (x_i, x_{i + D_h/2}), which is a
fixed permutation of the q/k projection columns and is what HF checkpoints use.)

The *interleaved* layout (``interleaved_rope_angles`` / ``apply_rope_interleaved``) is the
paper's and HF DeepSeek-V2's (``apply_rotary_emb`` with ``torch.view_as_complex``): the
pair (x_{2i}, x_{2i+1}) is the complex number z_i = x_{2i} + i x_{2i+1}, rotated as
z_i * exp(i p inv_freq_i), i.e.

  RoPE(x)_{2i}   = x_{2i} cos(p inv_freq_i) - x_{2i+1} sin(p inv_freq_i)
  RoPE(x)_{2i+1} = x_{2i} sin(p inv_freq_i) + x_{2i+1} cos(p inv_freq_i)
"""

from __future__ import annotations

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
