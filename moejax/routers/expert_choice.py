"""Expert-choice routing (Zhou et al., 2022).

Scores S = softmax(logits) over experts per token; then each expert picks the C tokens of
the group with the highest score for it, C = ceil(capacity_factor * n / E), so every
expert processes exactly C tokens (perfect load balance by construction) and a token is
processed by a variable number of experts (0..E). Gate value = the score. No balance loss
is needed; the z-loss is still applied for logit stability.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, routing_metrics, z_loss


@register_router("expert_choice")
def route_expert_choice(logits, cfg) -> Routing:
  c = cfg.capacity(logits.shape[1])
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  scores_es = jnp.swapaxes(probs, 1, 2)  # [G, E, S]
  combine_weight, dispatch_index = jax.lax.top_k(scores_es, c)  # [G, E, C]
  slot_valid = jnp.ones(dispatch_index.shape, bool)
  aux = {
    "load_balance_loss": jnp.zeros((), jnp.float32),
    "z_loss": cfg.z_loss_weight * z_loss(logits),
  }
  metrics = routing_metrics(slot_valid, probs, jnp.sum(slot_valid, axis=(1, 2)))
  return Routing(dispatch_index.astype(jnp.int32), combine_weight, slot_valid, aux, metrics)
