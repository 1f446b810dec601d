"""Multi-gate routing: one gate per task over shared experts (MMoE, Ma et al., 2018) and
HoME's expert hierarchy (Wang et al., 2024, "HoME: Hierarchy of Multi-Gate Experts").

Task t has its own gate W_t [d, R]; a token of task t is scored by its task's gate and
may only pick the experts of its hierarchy (``task_expert_mask``):

  l_s = x_s W_{t(s)}  masked to -inf outside allowed[t(s)],  then top-k (``topk``)

Expert layout (E = num_experts): the first E - K*n_c - T*n_t experts are shared by all
tasks, then n_c experts per category (K categories, ``task_categories``), then n_t per
task. With n_c = n_t = 0 every gate sees every expert (MMoE with sparse top-k gates).
The layer computes the logits (``multigate_logits``); the router is top-k over them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routers.base import Routing, register_router
from moejax.routers.topk import route_topk


def task_expert_mask(cfg) -> np.ndarray:
  """allowed bool[T, R]: the router columns task t's gate may pick (compressed experts,
  columns >= E, are open to every task)."""
  t, e = cfg.num_tasks, cfg.num_experts
  cats = cfg.task_categories or (0,) * t
  n_c, n_t = cfg.num_category_experts, cfg.num_task_experts
  shared = e - (max(cats) + 1) * n_c - t * n_t
  allowed = np.zeros((t, cfg.num_router_logits), bool)
  allowed[:, :shared] = True
  allowed[:, e:] = True
  for task, cat in enumerate(cats):
    start = shared + cat * n_c
    allowed[task, start : start + n_c] = True
    start = shared + (max(cats) + 1) * n_c + task * n_t
    allowed[task, start : start + n_t] = True
  return allowed


def multigate_logits(x: jax.Array, gates: jax.Array, task_id: jax.Array, cfg) -> jax.Array:
  """The task's gate, masked to its experts: x [G, S, d], gates [T, d, R], task_id
  i32[G, S] -> f32[G, S, R] ('gsd,tdr->gstr', then the row of task_id)."""
  all_gates = jnp.einsum("gsd,tdr->gstr", x.astype(jnp.float32), gates.astype(jnp.float32))
  logits = jnp.take_along_axis(all_gates, task_id[:, :, None, None], axis=2)[:, :, 0]
  allowed = jnp.asarray(task_expert_mask(cfg))[task_id]  # [G, S, R]
  return jnp.where(allowed, logits, -jnp.inf)


@register_router("multigate")
def route_multigate(logits, cfg) -> Routing:
  return route_topk(logits, cfg)
