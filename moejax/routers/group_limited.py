"""Group-limited (device/node-limited) expert selection (DeepSeek-AI, 2024, DeepSeek-V2
Sec. 2.1.3; DeepSeek-V3 Sec. 2.1.2).

The E experts form n_group contiguous groups of E / n_group. A token first keeps its
topk_group best groups, then takes its top-k experts among those groups only. A group's
score is the max of its experts' scores (V2, ``topk_method='group_limited_greedy'``) or the
sum of its two highest scores (V3, ``noaux_tc``).
"""

import jax
import jax.numpy as jnp

GROUP_SCORES = ("max", "top2_sum")


def group_limited_mask(
  scores: jax.Array, n_group: int, topk_group: int, group_score: str
) -> jax.Array | None:
  """bool[G, S, E]: expert e lies in one of the token's topk_group best groups.

  scores: f32[G, S, E]. Returns None when n_group == 1 (every expert allowed).
  """
  if n_group == 1:
    return None
  g, s, e = scores.shape
  grouped = scores.reshape(g, s, n_group, e // n_group)  # [G, S, n_group, E / n_group]
  if group_score == "max":
    per_group = jnp.max(grouped, axis=-1)
  elif group_score == "top2_sum":
    per_group = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
  else:
    raise ValueError(f"group_score={group_score!r}; allowed: {GROUP_SCORES}")
  _, top_groups = jax.lax.top_k(per_group, topk_group)  # [G, S, topk_group]
  keep = jnp.any(jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_), axis=-2)  # [G, S, n_group]
  return jnp.repeat(keep, e // n_group, axis=-1)
