"""DeepSeek-V3 routing (DeepSeek-AI, 2024, DeepSeek-V3 technical report, Sec. 2.1.2).

s_{i,t} = sigmoid(u_t . e_i); choose TopK_i(s_{i,t} + b_i) within the token's topk_group best
groups; g_{i,t} = a s_{i,t} / sum_{j chosen} s_{j,t} (a = routed_scaling_factor; no
normalisation if not norm_topk_prob). The bias b (``router_bias``) only steers selection,
updated b_i += gamma sign(mean_j c_j - c_i) (``update_router_bias``); the balance loss is
the sequence-wise alpha sum_i f_i P_i (eq. 17-20).
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, token_choice_routing
from moejax.routers.group_limited import group_limited_mask


@register_router("deepseek_v3", uses_bias=True)
def route_deepseek_v3(logits, cfg, bias) -> Routing:
  scores = jax.nn.sigmoid(logits)  # [G, S, E]
  choice = scores + bias
  allowed = group_limited_mask(choice, cfg.n_group, cfg.topk_group, "top2_sum")
  if allowed is not None:
    choice = jnp.where(allowed, choice, -jnp.inf)
  _, expert_index = jax.lax.top_k(choice, cfg.top_k)  # [G, S, K]
  weight = jnp.take_along_axis(scores, expert_index, axis=-1)
  if cfg.norm_topk_prob:
    weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
  weight = weight * cfg.routed_scaling_factor
  affinity = scores / jnp.sum(scores, axis=-1, keepdims=True)  # s'_{i,t}
  selected = jnp.ones(expert_index.shape, bool)
  routing = token_choice_routing(logits, affinity, expert_index, weight, selected, cfg)
  chosen = jnp.sum(jax.nn.one_hot(expert_index, cfg.num_experts), axis=(1, 2))  # [G, E]
  selected_load = jnp.mean(chosen / jnp.sum(chosen, axis=-1, keepdims=True), axis=0)
  return routing.replace(metrics=dict(routing.metrics, selected_load=selected_load))


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """The aux-loss-free bias rule: b_i + gamma * sign(mean_j c_j - c_i), f32[E] -> f32[E].

  An overloaded expert (c_i above the mean) loses gamma, an underloaded one gains gamma.
  """
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
