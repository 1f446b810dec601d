"""The router contract shared by every routing algorithm: ``route(logits, cfg) -> Routing``.

logits f32[G, S, R] (R = cfg.num_router_logits: real experts, then null experts). Every
router returns the slot form (GShard/Switch capacity): y_s = sum over the valid slots (e, c)
holding s of combine_weight[e, c] FFN_e(x_s); token-choice routers also the assignment
form: y_s = sum_{k: valid} weight[s, k] FFN_{expert_index[s, k]}(x_s), which dropless
layers sort by expert (``slots=False`` skips the slot form). ``uses_bias`` routers
(DeepSeek-V3) also take a selection bias f32[E], the ``router_bias`` param leaf.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from moejax.errors import config_error


@flax.struct.dataclass
class Routing:
  """The routing decision for one batch of groups (shapes in the field comments)."""

  dispatch_index: jax.Array | None  # i32[G, E, C]; None: assignment form only
  combine_weight: jax.Array | None  # f32[G, E, C]
  slot_valid: jax.Array | None  # bool[G, E, C]
  aux_losses: dict  # name -> f32[] (already multiplied by its config weight)
  metrics: dict  # name -> f32[] or f32[E] (diagnostics, no gradient intended)
  expert_index: jax.Array | None = None  # i32[G, S, K] (token-choice routers)
  weight: jax.Array | None = None  # f32[G, S, K]
  valid: jax.Array | None = None  # bool[G, S, K]
  selected: jax.Array | None = None  # bool[G, S, K] the router took choice k (any index)


class RouterFn(Protocol):
  def __call__(self, logits: jax.Array, cfg) -> Routing: ...


ROUTERS: dict[str, RouterFn] = {}
BIASED_ROUTERS: set[str] = set()  # routers that take a selection bias f32[E]


def register_router(name: str, uses_bias: bool = False) -> Callable[[RouterFn], RouterFn]:
  """Registers `fn` under `name` so configs can select it with ``moe.router=name``.

  The registered (and returned) router casts its logits to float32 first: routing in
  reduced precision is unstable (Fedus et al., 2021, Switch Transformers, Sec. 2.4,
  "selective precision"), and bfloat16 logits would otherwise give bfloat16 combine
  weights, losses and metrics (top-p's cumulative mass off by ~1e-2).
  """

  def wrap(fn: RouterFn) -> RouterFn:
    if name in ROUTERS:
      raise ValueError(f"router {name!r} registered twice")

    @functools.wraps(fn)
    def router(logits: jax.Array, cfg, bias: jax.Array | None = None) -> Routing:
      logits = jnp.asarray(logits, jnp.float32)
      if not uses_bias:
        return fn(logits, cfg)
      if bias is None:
        bias = jnp.zeros((cfg.num_experts,), jnp.float32)
      return fn(logits, cfg, jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32)))

    ROUTERS[name] = router
    if uses_bias:
      BIASED_ROUTERS.add(name)
    return router

  return wrap


def get_router(name: str) -> RouterFn:
  if name not in ROUTERS:
    raise config_error("moe.router", name, f"allowed routers are {sorted(ROUTERS)}")
  return ROUTERS[name]


def route(logits: jax.Array, cfg, slots: bool = True, bias: jax.Array | None = None) -> Routing:
  """Dispatches to the router named by ``cfg.router``.

  slots=False lets dropless token-choice routers return the assignment form only (no
  [G, E, S] buffers); otherwise the slot form is always present. `bias` f32[E]: the
  selection bias of a ``uses_bias`` router (ignored by the others).
  """
  routing = get_router(cfg.router)(logits, cfg, bias)
  if slots and routing.dispatch_index is None:
    s = logits.shape[1]
    dispatch_index, combine_weight, slot_valid, _ = assign_slots(
      routing.expert_index, routing.weight, routing.valid, cfg.num_experts, cfg.capacity(s)
    )
    routing = routing.replace(
      dispatch_index=dispatch_index, combine_weight=combine_weight, slot_valid=slot_valid
    )
  return routing


# ----------------------------------------------------------------------------------------
# Pieces shared by the token-choice routers.
# ----------------------------------------------------------------------------------------


def select_top_k(
  logits: jax.Array, k: int, order: str, allowed: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k expert choice per token.

  Args:
    logits: f32[G, S, R].
    k: experts per token.
    order: 'softmax_topk': w = softmax(logits)[top-k] (weights sum to <= 1);
      'topk_softmax': w = softmax(logits[top-k]) (weights sum to 1).
    allowed: optional bool[G, S, R]; the top-k is taken over the allowed experts only
      (group-limited routing), the probabilities stay softmax over all R.
  Returns:
    (probs f32[G, S, R] = softmax(logits), expert_index i32[G, S, k], weight f32[G, S, k]).
    Ties break towards the lower expert index (``lax.top_k``).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  choice = logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)
  top_logits, expert_index = jax.lax.top_k(choice, k)
  if order == "topk_softmax":
    weight = jax.nn.softmax(top_logits, axis=-1)
  else:
    weight = jnp.take_along_axis(probs, expert_index, axis=-1)
  return probs, expert_index, weight


def assign_slots(
  expert_index: jax.Array, weight: jax.Array, selected: jax.Array, num_experts: int, capacity: int
):
  """Places token-choice assignments into per-expert slots, dropping overflow.

  Priority follows GShard: every token's 1st choice is placed before any 2nd choice, and
  within one choice rank earlier tokens go first. Assignments to indices >= num_experts
  (null experts) or with ``selected == False`` take no slot and do not count as dropped.

  Args:
    expert_index: i32[G, S, K]; weight: f32[G, S, K]; selected: bool[G, S, K].
  Returns:
    dispatch_index i32[G, E, C], combine_weight f32[G, E, C], slot_valid bool[G, E, C],
    kept bool[G, S, K] (assignment got a slot).
  """
  g, s, k = expert_index.shape
  e, c = num_experts, capacity
  real = selected & (expert_index < e)
  # Rank-major order 'gks' so that choice rank 0 of all tokens comes first.
  idx_ks = jnp.swapaxes(expert_index, 1, 2).reshape(g, k * s)
  real_ks = jnp.swapaxes(real, 1, 2).reshape(g, k * s)
  onehot = jax.nn.one_hot(jnp.where(real_ks, idx_ks, e), e, dtype=jnp.int32)  # [G, KS, E]
  position_ks = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [G, KS]
  kept_ks = real_ks & (position_ks < c)
  token_ks = jnp.tile(jnp.arange(s, dtype=jnp.int32), k)[None].repeat(g, 0)  # [G, KS]
  weight_ks = jnp.swapaxes(weight, 1, 2).reshape(g, k * s)
  # Dropped assignments are written out of bounds and discarded by mode='drop'.
  slot_e = jnp.where(kept_ks, idx_ks, e)
  slot_c = jnp.where(kept_ks, position_ks, c)
  group = jnp.broadcast_to(jnp.arange(g)[:, None], (g, k * s))
  dispatch_index = (
    jnp.zeros((g, e, c), jnp.int32).at[group, slot_e, slot_c].set(token_ks, mode="drop")
  )
  combine_weight = (
    jnp.zeros((g, e, c), weight.dtype).at[group, slot_e, slot_c].set(weight_ks, mode="drop")
  )
  slot_valid = jnp.zeros((g, e, c), bool).at[group, slot_e, slot_c].set(True, mode="drop")
  kept = jnp.swapaxes(kept_ks.reshape(g, k, s), 1, 2)
  return dispatch_index, combine_weight, slot_valid, kept


def entropy(probs: jax.Array) -> jax.Array:
  """Per-token entropy in nats, H(p) = -sum_r p_r log p_r (0 log 0 = 0): [..., R] -> [...]."""
  safe_p = jnp.where(probs > 0, probs, 1.0)
  return -jnp.sum(probs * jnp.log(safe_p), axis=-1)


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss (Zoph et al., 2022, ST-MoE): mean_t logsumexp(logits_t)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def load_balance_loss(probs: jax.Array, assigned: jax.Array) -> jax.Array:
  """Switch-Transformer load-balancing loss (Fedus et al., 2021), generalised to top-k.

  Per group g: L_g = R * sum_r f_{g,r} * P_{g,r}, where f_{g,r} is the fraction of the
  group's (token, choice) assignments that went to expert r before capacity dropping and
  P_{g,r} the mean router probability of r; the loss is mean_g L_g (GShard computes it per
  group too). Per-group means make the sharded loss (a mean over devices' groups) equal
  the unsharded one. Equals 1 under perfectly uniform routing.

  Args:
    probs: f32[G, S, R]; assigned: f32[G, S, R], 1 where the token chose expert r.
  """
  num = probs.shape[-1]
  f = jnp.sum(assigned, axis=1) / jnp.maximum(jnp.sum(assigned, axis=(1, 2))[:, None], 1.0)
  p = jnp.mean(probs, axis=1)  # [G, R]
  return num * jnp.mean(jnp.sum(f * p, axis=-1))


def expert_counts(expert_index: jax.Array, kept: jax.Array, num_experts: int) -> jax.Array:
  """i32[G, E]: kept assignments per expert and group (a scatter-add, no one-hot)."""
  g = expert_index.shape[0]
  flat = jnp.where(kept, expert_index, num_experts).reshape(g, -1)  # [G, S*K]
  rows = jnp.broadcast_to(jnp.arange(g)[:, None], flat.shape)
  return jnp.zeros((g, num_experts), jnp.int32).at[rows, flat].add(1, mode="drop")


def assignment_metrics(
  expert_index: jax.Array, valid: jax.Array, kept: jax.Array, probs: jax.Array, num_experts: int
) -> dict:
  """``routing_metrics`` of the assignment form: `kept` (bool[G, S, K], a subset of
  `valid`) are the assignments that were processed. Same values as the slot form."""
  per_expert = expert_counts(expert_index, kept, num_experts)
  return routing_metrics(None, probs, jnp.sum(valid, axis=(1, 2)), per_expert=per_expert)


def routing_metrics(
  slot_valid: jax.Array | None,
  probs: jax.Array,
  num_selected_real: jax.Array,
  per_expert: jax.Array | None = None,
) -> dict:
  """Diagnostics common to all routers, each a mean of per-group values (so a mean over
  devices' groups equals the unsharded value).

  expert_load f32[E]: share of processed (token, expert) pairs per expert (sums to 1, or
    to 0 in a group where no expert processes any token).
  dropped_fraction: dropped real assignments / selected real assignments (0 in a group
    that selected none, e.g. AdaMoE tokens all choosing null experts).
  experts_per_token: mean number of real experts that process a token.
  router_entropy: mean entropy of the router distribution, in nats.

  Args:
    slot_valid: bool[G, E, C]; probs: f32[G, S, R]; num_selected_real: i32[G].
    per_expert: i32[G, E] processed assignments per expert, instead of `slot_valid`.
  """
  s = probs.shape[1]
  if per_expert is None:
    per_expert = jnp.sum(slot_valid, axis=2)
  per_expert = per_expert.astype(jnp.float32)  # [G, E]
  kept = jnp.sum(per_expert, axis=1)  # [G]
  selected = num_selected_real.astype(jnp.float32)  # [G]
  return {
    "expert_load": jnp.mean(per_expert / jnp.maximum(kept, 1.0)[:, None], axis=0),
    "dropped_fraction": jnp.mean((selected - kept) / jnp.maximum(selected, 1.0)),
    "experts_per_token": jnp.mean(kept) / s,
    "router_entropy": jnp.mean(entropy(probs)),
  }


def token_choice_routing(
  logits: jax.Array,
  probs: jax.Array,
  expert_index: jax.Array,
  weight: jax.Array,
  selected: jax.Array,
  cfg,
  balance_probs: jax.Array | None = None,
  balance_assigned: jax.Array | None = None,
) -> Routing:
  """Assignments (slots too unless dropless), aux losses and metrics shared by all
  token-choice routers."""
  s = logits.shape[1]
  valid = selected & (expert_index < cfg.num_experts)
  if balance_assigned is None:
    balance_probs = probs
    balance_assigned = jnp.sum(
      jax.nn.one_hot(expert_index, probs.shape[-1]) * selected[..., None], axis=2
    )
  aux = {
    "load_balance_loss": cfg.load_balance_weight
    * load_balance_loss(balance_probs, balance_assigned),
    "z_loss": cfg.z_loss_weight * z_loss(logits),
  }
  if cfg.dropless:  # every valid assignment is kept; slots only if asked (``route``)
    metrics = assignment_metrics(expert_index, valid, valid, probs, cfg.num_experts)
    return Routing(None, None, None, aux, metrics, expert_index, weight, valid, selected)
  dispatch_index, combine_weight, slot_valid, _ = assign_slots(
    expert_index, weight, selected, cfg.num_experts, cfg.capacity(s)
  )
  metrics = routing_metrics(slot_valid, probs, jnp.sum(valid, axis=(1, 2)))
  return Routing(
    dispatch_index, combine_weight, slot_valid, aux, metrics, expert_index, weight, valid, selected
  )
