"""Pre-gating router decoupled from the backbone (Read-ME, Cai et al., 2024).

A small separate network maps each token's embedding e_s (before any transformer block)
to the router logits of every MoE layer at once,

  l_s^(m) = W_2^(m) silu(W_1 RMSNorm(e_s)),   W_1 [d, h], W_2 [h, M, R]

so a token's experts in all M MoE layers are known as soon as the token is (lookahead:
prefetch, expert-aware batching). The network lives in ``moejax.models.transformer``
(``PreGate``); the router is top-k over its logits. ``distinct_experts`` counts the
experts a decode step and a whole batch touch, the quantity lookahead scheduling saves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router
from moejax.routers.topk import route_topk


@register_router("pregate")
def route_pregate(logits, cfg) -> Routing:
  return route_topk(logits, cfg)


def distinct_experts(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> dict:
  """Experts touched while decoding, per MoE layer.

  Args:
    expert_index: i32[T, B, M, K] each decode step's choices (T steps, B sequences,
      M MoE layers, K choices); valid: bool[T, B, M, K] (False: not a real expert).
  Returns:
    per_step i32[T, M]: |union over the batch of the experts of step t| -- the expert
      weights step t must read; per_batch i32[M]: |union over steps and batch|;
    per_token f32[M]: mean real experts per (step, sequence).
  """
  hit = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * valid[..., None]
  used = jnp.max(hit, axis=-2)  # [T, B, M, E]
  return {
    "per_step": jnp.sum(jnp.max(used, axis=1), axis=-1),
    "per_batch": jnp.sum(jnp.max(used, axis=(0, 1)), axis=-1),
    "per_token": jnp.mean(jnp.sum(used, axis=-1), axis=(0, 1)).astype(jnp.float32),
  }
