"""Dispatch (tokens -> expert slot buffers) and combine (slot outputs -> tokens).

Index gather/scatter rather than one-hot einsums: on CPU a one-hot dispatch tensor costs
about 8x a dense FFN of equal FLOPs, while gather/scatter into [E, C, d] buffers costs
about the capacity factor (measured; see benchmarks/moe_layer.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dispatch(x: jax.Array, dispatch_index: jax.Array, slot_valid: jax.Array) -> jax.Array:
  """Gathers tokens into slots: x [G, S, d], index/valid [G, E, C] -> [G, E, C, d].

  Empty slots hold zeros, so they contribute nothing and produce finite outputs.
  """
  g, e, c = dispatch_index.shape
  flat = dispatch_index.reshape(g, e * c, 1)
  gathered = jnp.take_along_axis(x, flat, axis=1)  # [G, E*C, d]
  gathered = jnp.where(slot_valid.reshape(g, e * c, 1), gathered, 0)
  return gathered.reshape(g, e, c, x.shape[-1])


def combine(
  expert_out: jax.Array, dispatch_index: jax.Array, combine_weight: jax.Array, group_size: int
) -> jax.Array:
  """Scatter-adds weighted slot outputs back to tokens.

  y[g, s] = sum_{e, c: dispatch_index[g, e, c] = s} combine_weight[g, e, c] * out[g, e, c]
  expert_out [G, E, C, d] -> [G, S, d]. Empty slots have weight 0.
  """
  g, e, c, d = expert_out.shape
  weighted = expert_out * combine_weight[..., None].astype(expert_out.dtype)
  weighted = weighted.reshape(g, e * c, d)
  index = dispatch_index.reshape(g, e * c)

  def one_group(idx, upd):
    return jnp.zeros((group_size, d), upd.dtype).at[idx].add(upd)

  return jax.vmap(one_group)(index, weighted)
