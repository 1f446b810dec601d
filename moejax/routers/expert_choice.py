"""Expert-choice routing (Zhou et al., 2022).

Scores S = softmax(logits) over experts per token; then each expert picks the C tokens of
the group with the highest score for it, C = ceil(capacity_factor * n / E), so every
expert processes exactly C tokens (perfect load balance by construction) and a token is
processed by a variable number of experts (0..E). Gate value = the score. No balance loss
is needed; the z-loss is still applied for logit stability.

Tokens are ranked on the log-odds log(S / (1 - S)) (``log_odds``), which orders them as
S and log S do but keeps full float32 resolution near S = 1: with logit gaps > ~16 the
float32 probabilities of a confident router (and log_softmax, through its logsumexp) all
round to 1.0 (0.0), and ``top_k`` would keep the earliest positions, not the best tokens.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import Routing, register_router, routing_metrics, z_loss


def log_odds(logits: jax.Array) -> jax.Array:
  """log(p / (1 - p)) of p = softmax(logits) per expert, accurate for p near 0 and 1: [..., E].

  The argmax expert: l_e - logsumexp_{j != e} l_j (no cancellation). Any other expert has
  p <= 1/2, so l_e - logsumexp(l) - log1p(-p) is well conditioned.
  """
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  is_top = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.bool_)
  lse_rest = jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, logits), axis=-1, keepdims=True)
  log_p = logits - lse
  other = log_p - jnp.log1p(-jnp.minimum(jnp.exp(log_p), 0.5))
  return jnp.where(is_top, logits - lse_rest, other)


@register_router("expert_choice")
def route_expert_choice(logits, cfg) -> Routing:
  c = cfg.capacity(logits.shape[1])
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  _, dispatch_index = jax.lax.top_k(jnp.swapaxes(log_odds(logits), 1, 2), c)  # [G, E, C]
  combine_weight = jnp.take_along_axis(jnp.swapaxes(probs, 1, 2), dispatch_index, axis=-1)
  slot_valid = jnp.ones(dispatch_index.shape, bool)
  aux = {
    "load_balance_loss": jnp.zeros((), jnp.float32),
    "z_loss": cfg.z_loss_weight * z_loss(logits),
  }
  metrics = routing_metrics(slot_valid, probs, jnp.sum(slot_valid, axis=(1, 2)))
  return Routing(dispatch_index.astype(jnp.int32), combine_weight, slot_valid, aux, metrics)
