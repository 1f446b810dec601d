"""DeepSeekMoE routing (Dai et al., 2024): shared experts + fine-grained routed experts.

The shared experts run densely in the MoE layer; the routed part is softmax -> top-k with
unnormalised gates g_{i,t} = s_{i,t} (eq. 5) times a = ``routed_scaling_factor`` (DeepSeek-V2:
16, V2-Lite: 1), and the balance loss alpha sum_i f_i P_i, f_i = E / (k T) sum_t 1(t chose
i) (the Switch loss over assignments). n_group > 1: group-limited top-k as DeepSeek-V2's
``group_limited_greedy``.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, select_top_k, token_choice_routing
from moejax.routers.group_limited import group_limited_mask


@register_router("shared_experts")
def route_shared_experts(logits, cfg) -> Routing:
  probs = jax.nn.softmax(logits, axis=-1)
  allowed = group_limited_mask(probs, cfg.n_group, cfg.topk_group, "max")
  probs, expert_index, weight = select_top_k(logits, cfg.top_k, cfg.router_order, allowed)
  weight = weight * cfg.routed_scaling_factor
  selected = jnp.ones(expert_index.shape, bool)
  return token_choice_routing(logits, probs, expert_index, weight, selected, cfg)
