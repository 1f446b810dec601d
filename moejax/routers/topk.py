"""Top-k token-choice routing (GShard, Lepikhin et al., 2020; Switch, Fedus et al., 2021).

Each token picks its k highest-scoring experts; each expert holds at most
C = ceil(capacity_factor * S * k / E) tokens per group and drops the overflow (the token
then skips that expert; its residual connection carries it). ``dropless=True`` sets C = S.
"""

import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, select_top_k, token_choice_routing


@register_router("topk")
def route_topk(logits, cfg) -> Routing:
  probs, expert_index, weight = select_top_k(logits, cfg.top_k, cfg.router_order)
  selected = jnp.ones(expert_index.shape, bool)
  return token_choice_routing(logits, probs, expert_index, weight, selected, cfg)
