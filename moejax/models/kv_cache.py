"""The decode-time KV cache of the attention layers (``moejax.inference`` drives it).

A cached forward gets a ``DecodeStep``: ``index``, the cache slot of the first of its L
new tokens, and ``mask`` bool [B, L, M], which cached slots each new token may attend to
(the caller's causal and padding mask over the M slots). Each attention layer keeps its
per-token tensors in the flax ``'cache'`` collection, [B, M, ...], and writes the new
tokens' rows at slots [index, index + L).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class DecodeStep(NamedTuple):
  index: jax.Array  # int32 []
  mask: jax.Array  # bool [B, L, M]


def update_cache(module: nn.Module, name: str, value: jax.Array, step: DecodeStep) -> jax.Array:
  """Writes value [B, L, ...] into ``module``'s cache variable `name` [B, M, ...] at slots
  [index, index + L) and returns the whole updated cache [B, M, ...]."""
  shape = (value.shape[0], step.mask.shape[-1]) + value.shape[2:]
  var = module.variable("cache", name, jnp.zeros, shape, value.dtype)
  var.value = jax.lax.dynamic_update_slice_in_dim(
    var.value, value.astype(var.value.dtype), step.index, axis=1
  )
  return var.value
