"""The routed MoE forward on one device: route, run the experts, combine.

Two forms, chosen by the config (``MoEConfig.sorted_dropless``):

  slots    (capacity configs, and dropless with expert_impl='capacity'): tokens gathered
           into per-expert slot buffers [G, E, C, d], every expert run on its C slots,
           outputs scatter-added back with their combine weights (GShard/Switch).
  sorted   (dropless token choice): the (token, choice) assignments sorted by expert and
           run as one grouped matmul (``moejax.layers.grouped``); each assignment's
           output gathered back and weighted. Only real, selected assignments cost work.

  y_t = sum_{e in routed(t)} g_{t,e} FFN_e(x_t)

The expert-parallel layer (``moejax.layers.expert_parallel``) reuses these pieces with an
exchange between devices around the expert FFNs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.layers.dispatch import combine, dispatch
from moejax.layers.ffn import expert_ffn
from moejax.layers.grouped import grouped_ffn
from moejax.moe_config import MoEConfig
from moejax.routers import Routing, route


def router_logits(x: jax.Array, router_kernel: jax.Array) -> jax.Array:
  """'gsd,dr->gsr' in float32: x [G, S, d], kernel [d, E + N] -> [G, S, E + N]."""
  return jnp.einsum("gsd,dr->gsr", x.astype(jnp.float32), router_kernel.astype(jnp.float32))


def combine_assignments(y_assign: jax.Array, routing: Routing, kept: jax.Array) -> jax.Array:
  """y_t = sum_k kept[t, k] w[t, k] y_assign[t, k]: y_assign [G, S, K, d] -> [G, S, d]."""
  w = jnp.where(kept, routing.weight, 0.0).astype(y_assign.dtype)
  return jnp.einsum("gskd,gsk->gsd", y_assign, w)


def sorted_experts(
  x: jax.Array,
  routing: Routing,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  cfg: MoEConfig,
) -> jax.Array:
  """All E experts on this device, over expert-sorted assignments: x [G, S, d] -> [G, S, d]."""
  g, s, d = x.shape
  k = routing.expert_index.shape[-1]
  y_assign = grouped_ffn(
    x.reshape(g * s, d),  # assignment a's input: token a // k
    routing.expert_index.reshape(-1),
    routing.valid.reshape(-1),
    w_gate,
    w_up,
    w_down,
    cfg.activation,
    cfg.resolved_expert_impl(),
    cfg.expert_block_size,
    cfg.resolved_dropless_windows(),
    repeat=k,
  )
  return combine_assignments(y_assign.reshape(g, s, k, d), routing, routing.valid)


def slot_experts(
  x: jax.Array,
  routing: Routing,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  cfg: MoEConfig,
  expert_fn=None,
) -> jax.Array:
  """Slot-buffer experts: x [G, S, d] -> [G, S, d]. `expert_fn` maps x_slots
  [G, E, C, d] to their outputs (default: all E experts on this device)."""
  x_slots = dispatch(x, routing.dispatch_index, routing.slot_valid)  # [G, E, C, d]
  if expert_fn is None:
    y_slots = expert_ffn(x_slots, w_gate, w_up, w_down, cfg.activation)
  else:
    y_slots = expert_fn(x_slots, w_gate, w_up, w_down)
  return combine(y_slots, routing.dispatch_index, routing.combine_weight, x.shape[1])


def compressed_output(routing: Routing, vectors: jax.Array, num_experts: int) -> jax.Array:
  """Compressed Experts (He et al., 2025): a pick of column E + j adds g * c_j,
  y_s = sum_{k: selected, E <= i_k < E + J} w[s, k] c_{i_k - E}; vectors c [J, d] ->
  [G, S, d]."""
  j = routing.expert_index - num_experts  # [G, S, K]
  hit = routing.selected & (j >= 0) & (j < vectors.shape[0])
  w = jnp.where(hit, routing.weight, 0.0)
  onehot = jax.nn.one_hot(jnp.where(hit, j, 0), vectors.shape[0], dtype=jnp.float32)
  return jnp.einsum("gsk,gskj,jd->gsd", w, onehot, vectors.astype(jnp.float32))


def moe_forward(
  x: jax.Array,
  router_kernel: jax.Array | None,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  cfg: MoEConfig,
  logits: jax.Array | None = None,
  compressed: jax.Array | None = None,
  router_bias: jax.Array | None = None,
):
  """Routes, runs and combines one batch of token groups on one device.

  Args:
    x: [G, S, d] tokens in compute dtype.
    router_kernel: [d, E + N] gating weights (logits computed in float32).
    w_gate, w_up: [E, d, f]; w_down: [E, f, d].
    logits: f32[G, S, R] router logits computed elsewhere (multi-gate, pre-gating
      routers); router_kernel is then unused.
    compressed: [J, d] compressed-expert vectors (``cfg.num_compressed_experts`` = J).
    router_bias: f32[E] selection bias of a ``uses_bias`` router (DeepSeek-V3), or None.
  Returns:
    (y [G, S, d], aux_losses dict, metrics dict).
  """
  if logits is None:
    logits = router_logits(x, router_kernel)
  if cfg.sorted_dropless:
    routing = route(logits, cfg, slots=False, bias=router_bias)
    y = sorted_experts(x, routing, w_gate, w_up, w_down, cfg)
  else:
    routing = route(logits, cfg, bias=router_bias)
    y = slot_experts(x, routing, w_gate, w_up, w_down, cfg)
  if compressed is not None:
    y = y + compressed_output(routing, compressed, cfg.num_experts).astype(y.dtype)
  return y, routing.aux_losses, routing.metrics
