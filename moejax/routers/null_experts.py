"""AdaMoE null-expert routing (Zeng et al., 2024).

The router scores E real experts plus N null experts; a null expert outputs zero and costs
no FLOPs. Top-k is taken over all E + N, so a token uses between 0 and k real experts,
adaptively. Null experts never get slots, so they are never computed or communicated.

Load balancing as in the paper: null experts are interchangeable, so their loads are
averaged before the Switch loss is applied. With f, P over the E + N logits,
  L = (E + N) * ( sum_{i<E} f_i P_i + N * mean_{j>=E} f_j * mean_{j>=E} P_j ),
which lets tokens favour "null" as a group without pressure on which null expert.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, select_top_k, token_choice_routing


def _average_null_columns(values: jax.Array, num_real: int) -> jax.Array:
  real, null = values[..., :num_real], values[..., num_real:]
  null_mean = jnp.mean(null, axis=-1, keepdims=True)
  return jnp.concatenate([real, jnp.broadcast_to(null_mean, null.shape)], axis=-1)


@register_router("null_experts")
def route_null_experts(logits, cfg) -> Routing:
  probs, expert_index, weight = select_top_k(logits, cfg.top_k, cfg.router_order)
  selected = jnp.ones(expert_index.shape, bool)
  assigned = jnp.sum(jax.nn.one_hot(expert_index, logits.shape[-1]), axis=2)  # [G, S, E+N]
  # Averaging the null columns of both f and P gives N * mean(f) * mean(P) for the nulls.
  balance_assigned = _average_null_columns(assigned, cfg.num_experts)
  balance_probs = _average_null_columns(probs, cfg.num_experts)
  return token_choice_routing(
    logits,
    probs,
    expert_index,
    weight,
    selected,
    cfg,
    balance_probs=balance_probs,
    balance_assigned=balance_assigned,
  )
