"""DeepSeekMoE routing (Dai et al., 2024): shared experts + fine-grained routed experts.

DeepSeekMoE splits each of N experts into m finer ones (E = m*N routed experts, each
1/m as wide, k = m*K of them active) and adds K_s *shared* experts every token uses.
The shared experts need no routing decision (the MoE layer applies them densely, see
``moejax.layers.moe``); the routed part is softmax -> top-k with unnormalised gate values
g_{i,t} = s_{i,t} (paper eq. 5), and the expert-level balance loss
L = alpha * sum_i f_i P_i with f_i = E / (k T) * sum_t 1(token t chose i), which equals
the Switch loss computed over assignments.

DeepSeek-V2's released model (DeepSeek-AI, 2024; its config's ``routed_scaling_factor``,
16 for V2, 1 for V2-Lite) multiplies the routed gate values by a = cfg.routed_scaling_factor
(default 1): y_t = FFN_shared(x_t) + sum_i a * g_{i,t} FFN_i(x_t). The balance loss and
metrics use the unscaled probabilities.

With n_group > 1 the top-k is group-limited as DeepSeek-V2's ``group_limited_greedy``: only
experts in the token's topk_group groups of highest max-probability compete
(``moejax.routers.group_limited``).
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
