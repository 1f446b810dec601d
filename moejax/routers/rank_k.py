"""Rank-k routing: each token uses only its k-th ranked expert (k = ``cfg.top_k``).

The weak activation of SCMoE self-contrast decoding (Shi et al., 2024, "Unchosen Experts
Can Contribute Too"; ``moejax.inference.contrast``), not a training router. The gate value
follows ``router_order`` for a one-expert selection: 'topk_softmax' renormalises over the
single chosen logit (weight 1, Mixtral), 'softmax_topk' keeps its softmax probability
(DeepSeekMoE); times ``routed_scaling_factor``. A null expert at rank k gives no routed
output. rank_k with k = 1 is top-1 routing.
"""

import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, select_top_k, token_choice_routing


@register_router("rank_k")
def route_rank_k(logits, cfg) -> Routing:
  probs, ranked, weight = select_top_k(logits, cfg.top_k, "softmax_topk")  # [G, S, k]
  expert_index = ranked[..., -1:]  # [G, S, 1]: the k-th ranked expert
  weight = (
    weight[..., -1:] if cfg.router_order == "softmax_topk" else jnp.ones_like(weight[..., -1:])
  )
  weight = weight * cfg.routed_scaling_factor
  selected = jnp.ones(expert_index.shape, bool)
  return token_choice_routing(logits, probs, expert_index, weight, selected, cfg)
