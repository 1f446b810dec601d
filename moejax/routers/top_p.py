"""Top-p dynamic routing (Huang et al., 2024, "Harder Tasks Need More Experts").

Experts are added in descending router probability until their cumulative probability
reaches p: token t uses the smallest prefix {e_(1..k_t)} of its sorted experts with
sum_j P_{t,e_(j)} >= p, capped at ``top_k`` experts. Gate values are the raw
probabilities. The paper's dynamic loss, the mean entropy of the router distribution,
pushes routers to be confident (fewer experts per token); its weight is
``dynamic_loss_weight``. Capacity uses k = top_k (the cap), so C bounds the worst case.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, entropy, register_router, token_choice_routing


@register_router("top_p")
def route_top_p(logits, cfg) -> Routing:
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, expert_index = jax.lax.top_k(probs, cfg.top_k)  # [G, S, K] descending
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  selected = mass_before < cfg.top_p  # the first expert is always selected
  routing = token_choice_routing(logits, probs, expert_index, sorted_probs, selected, cfg)
  aux = dict(routing.aux_losses, dynamic_loss=cfg.dynamic_loss_weight * jnp.mean(entropy(probs)))
  return routing.replace(aux_losses=aux)
