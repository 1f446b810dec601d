"""Property-based (hypothesis) tests of the routers, the MoE layer and MoEConfig validation.

Hypothesis draws small shapes (G in 1..3 groups, S in 1..16 tokens, E in 1..8 experts,
k in 1..min(E, 4)), capacity factors down to ones giving C = 1 and up to ones clamped at
C = S, and degenerate logits: ties (all equal, or drawn from {-1, 0, 1}), one column
every token prefers (+1e4), extreme values (+-1e4), in float32 and bfloat16. The
properties are the router contract of ``moejax.routers.base`` (slot buffers over the E
real experts) and each router's definition:

  * everything finite; dispatch indices in [0, S); a token at most once per expert;
    at most C = cfg.capacity(S) valid slots per expert; empty slots weigh 0;
  * token choice (GShard/Switch top-k, AdaMoE null experts, DeepSeekMoE routed part,
    top-p): at most k experts per token, weights >= 0 summing to <= 1 (times
    DeepSeek-V2's routed_scaling_factor for shared_experts), exactly the
    slots of the GShard priority rule (all 1st choices before 2nd choices, earlier tokens
    first) applied to a per-token top-k of the same float32 logits (ties to the lower
    index, like ``lax.top_k``); dropless top-k gives every token exactly k experts;
  * expert choice (Zhou et al., 2022): every expert takes exactly C distinct tokens, the
    ones with the highest softmax score for it, weighted by that score;
  * top-p (Huang et al., 2024): experts added in descending probability until their mass
    reaches p, or top_k of them;
  * the MoE layer equals y_t = sum_{valid (e, c) with index t} w_{e,c} FFN_e(x_t)
    (+ the shared FFN), a per-token float64 loop over the same Routing.

Compiles dominate the cost (one per drawn config and shape), so each drawn case runs every
logits kind through one compiled function per dtype; ``-m slow`` runs longer variants.

Bugs these tests found (each with a plain regression test below): MoEConfig.capacity
raised OverflowError for huge capacity factors, returned 0 for subnormal ones and rounded
up one slot too many when cf * S * k / E is an integer that floats miss (1.1 * 200 * 2 / 8);
bfloat16 logits were routed in bfloat16; dropped_fraction was 1 instead of 0 for groups
whose tokens all chose null experts; a bad num_null_experts was blamed on top_k.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from moejax.errors import ConfigError
from moejax.layers import MoELayer, combine, dispatch, to_groups
from moejax.moe_config import ACTIVATIONS, EP_EXCHANGES, EXPERT_IMPLS, ROUTER_ORDERS, MoEConfig
from moejax.routers import ROUTERS, assign_slots, route

try:
  from tests import reference as ref
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
  import reference as ref

ALL_ROUTERS = ("topk", "expert_choice", "null_experts", "shared_experts", "top_p")
HAS_ROUTED_SCALING = "routed_scaling_factor" in {f.name for f in dataclasses.fields(MoEConfig)}
TOL = 1e-5  # float32 routing vs float64 numpy

jroute = jax.jit(route, static_argnums=1)


def props(max_examples: int):
  """Hypothesis settings for jit-heavy tests: no deadline (first calls compile) and no
  shrinking, which would recompile for every candidate (minutes); failures report the
  drawn case and its notes as found. Set MOEJAX_HYPOTHESIS_SHRINK=1 to shrink."""
  phases = [Phase.explicit, Phase.reuse, Phase.generate]
  if os.environ.get("MOEJAX_HYPOTHESIS_SHRINK") == "1":
    phases.append(Phase.shrink)
  return settings(
    max_examples=max_examples,
    deadline=None,
    phases=phases,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------

# Special values first: 5e-324 (the smallest float), 1e-9 (C = 1), 1e308 (C clamped at S;
# cf * S * k overflows a float).
CAPACITY_FACTORS = st.one_of(
  st.sampled_from([5e-324, 1e-9, 0.25, 0.5, 0.7, 1.0, 1.25, 2.0, 1e308]),
  st.floats(min_value=0.01, max_value=4.0),
)
TOP_PS = st.one_of(
  st.sampled_from([1e-6, 0.3, 0.5, 0.9, 1.0]), st.floats(min_value=0.01, max_value=1.0)
)


@st.composite
def moe_configs(draw, router: str | None = None, max_experts: int = 8) -> MoEConfig:
  """A valid MoEConfig for `router` (drawn if None) with small E, k."""
  router = draw(st.sampled_from(ALL_ROUTERS)) if router is None else router
  e = draw(st.integers(1, max_experts))
  n = draw(st.integers(1, 3)) if router == "null_experts" else 0
  kw = dict(
    router=router,
    num_experts=e,
    num_null_experts=n,
    expert_d_ff=3,
    top_k=draw(st.integers(1, min(e + n, 4))),
    capacity_factor=draw(CAPACITY_FACTORS),
    load_balance_weight=draw(st.sampled_from([0.0, 0.01, 1.0])),
    z_loss_weight=draw(st.sampled_from([0.0, 1e-3, 1.0])),
  )
  if router != "expert_choice":
    kw["dropless"] = draw(st.booleans())
    kw["router_order"] = draw(st.sampled_from(ROUTER_ORDERS))
  if router == "shared_experts":
    kw["num_shared_experts"] = draw(st.integers(1, 2))
    if HAS_ROUTED_SCALING:
      kw["routed_scaling_factor"] = draw(st.sampled_from([1.0, 1.0, 2.5, 16.0]))
  if router == "top_p":
    kw["top_p"] = draw(TOP_PS)
    kw["dynamic_loss_weight"] = draw(st.sampled_from([0.0, 1.0]))
  return MoEConfig(**kw)


LOGIT_KINDS = ("gaussian", "equal", "tiny_set", "one_column", "extreme", "huge_spread")
BF16_KINDS = ("gaussian", "tiny_set", "one_column", "extreme")


def make_logits(kind: str, rng: np.random.Generator, shape) -> np.ndarray:
  """float32 logits [G, S, R] of one degenerate (or not) kind."""
  if kind == "gaussian":
    z = 2.0 * rng.standard_normal(shape)
  elif kind == "equal":  # every expert ties for every token
    z = np.full(shape, rng.uniform(-3, 3))
  elif kind == "tiny_set":  # many ties
    z = rng.choice([-1.0, 0.0, 1.0], size=shape)
  elif kind == "one_column":  # every token prefers expert j by a huge margin
    z = rng.standard_normal(shape)
    z[..., rng.integers(shape[-1])] += 1e4
  elif kind == "extreme":  # +-1e4 only: ties and underflowing probabilities
    z = rng.choice([-1e4, 1e4], size=shape)
  elif kind == "huge_spread":  # distinct but far apart: softmax is one-hot
    z = rng.uniform(-1e4, 1e4, size=shape)
  else:
    raise ValueError(kind)
  return z.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Routing checks (numpy, float64)
# ----------------------------------------------------------------------------------------


def weight_scale(cfg: MoEConfig) -> float:
  """DeepSeek-V2's routed_scaling_factor a: routed weights are a * probabilities."""
  return float(getattr(cfg, "routed_scaling_factor", 1.0))


def slot_dict(routing, g: int) -> dict:
  """{(expert, token): weight} over the valid slots of group g."""
  idx = np.asarray(routing.dispatch_index[g])
  w = np.asarray(routing.combine_weight[g], np.float64)
  valid = np.asarray(routing.slot_valid[g])
  return {(int(e), int(idx[e, c])): float(w[e, c]) for e, c in zip(*np.nonzero(valid))}


def check_contract(routing, cfg: MoEConfig, s: int, g: int) -> None:
  """The router contract every router satisfies (see moejax.routers.base)."""
  e, c = cfg.num_experts, cfg.capacity(s)
  chex.assert_shape([routing.dispatch_index, routing.combine_weight, routing.slot_valid], (g, e, c))
  assert routing.dispatch_index.dtype == jnp.int32
  assert routing.slot_valid.dtype == jnp.bool_
  assert routing.combine_weight.dtype == jnp.float32, routing.combine_weight.dtype
  for name, value in {**routing.aux_losses, **routing.metrics}.items():
    value = np.asarray(value, np.float64)
    assert np.all(np.isfinite(value)), f"{name} = {value}"
  for name, value in routing.aux_losses.items():
    chex.assert_shape(value, ())
    assert float(value) >= 0.0, f"{name} = {value}"
  idx = np.asarray(routing.dispatch_index)
  w = np.asarray(routing.combine_weight, np.float64)
  valid = np.asarray(routing.slot_valid)
  assert np.all(np.isfinite(w))
  assert np.all((idx >= 0) & (idx < s)), "dispatch index outside the group"
  assert np.all(w[~valid] == 0), "empty slots must weigh 0"
  assert np.all(w >= 0) and np.all(w <= weight_scale(cfg) * (1 + TOL)), "probabilities"
  assert np.all(valid.sum(-1) <= c)
  for gi in range(g):
    for ei in range(e):
      tokens = idx[gi, ei][valid[gi, ei]]
      assert len(set(tokens.tolist())) == len(tokens), f"token twice in expert {ei}"
  # Metrics: per-group means of per-group values.
  m = {k: np.asarray(v, np.float64) for k, v in routing.metrics.items()}
  per_expert = valid.sum(-1).astype(np.float64)  # [G, E]
  kept = per_expert.sum(-1)  # [G]
  np.testing.assert_allclose(
    m["expert_load"], np.mean(per_expert / np.maximum(kept, 1)[:, None], axis=0), atol=1e-6
  )
  np.testing.assert_allclose(m["experts_per_token"], kept.mean() / s, rtol=1e-6)
  assert -TOL <= m["dropped_fraction"] <= 1 + TOL
  assert -TOL <= m["router_entropy"] <= math.log(cfg.num_router_logits) + 1e-4


def token_choices(logits_gs: np.ndarray, cfg: MoEConfig):
  """One token's pre-capacity choices [(expert, weight)] in rank order (tests/reference)."""
  router = "top_p" if cfg.router == "top_p" else "topk"
  return ref.token_choices(logits_gs, router, cfg.top_k, cfg.router_order, cfg.top_p)


def top_p_is_ambiguous(logits_gs: np.ndarray, cfg: MoEConfig) -> bool:
  """Whether float32 rounding may decide this token's top-p selection (a prefix mass
  within 1e-5 of p)."""
  probs = ref.softmax(logits_gs)
  mass = np.cumsum(probs[ref.ranked(logits_gs)])[: cfg.top_k]
  return bool(np.any(np.abs(mass - cfg.top_p) < 1e-5))


def check_token_choice(routing, cfg: MoEConfig, logits: np.ndarray) -> None:
  """Slots == GShard assignment of the per-token top-k (top-p) of the same logits."""
  g, s, _ = logits.shape
  e, c, k = cfg.num_experts, cfg.capacity(s), cfg.top_k
  scale = weight_scale(cfg)
  dropped = []
  for gi in range(g):
    got = slot_dict(routing, gi)
    per_token = np.bincount([t for _, t in got], minlength=s)
    assert per_token.max(initial=0) <= k, "a token got more than k experts"
    sums = np.zeros(s)
    for (_, t), w in got.items():
      sums[t] += w
    assert np.all(sums <= scale * (1 + TOL)), f"weights of a token sum to {sums.max()}"
    if cfg.router == "top_p" and any(top_p_is_ambiguous(logits[gi, t], cfg) for t in range(s)):
      continue
    choices = [token_choices(logits[gi, t], cfg) for t in range(s)]
    expected, n_selected = ref.gshard_assign(choices, e, c)
    assert sorted(got) == sorted(expected), (
      f"group {gi}: only in router {sorted(set(got) - set(expected))}, "
      f"only in reference {sorted(set(expected) - set(got))}"
    )
    for key, w in expected.items():
      np.testing.assert_allclose(got[key], scale * w, rtol=1e-5, atol=1e-6, err_msg=str(key))
    dropped.append((n_selected - len(expected)) / max(n_selected, 1))
    # topk_softmax (Mixtral) renormalises over the k picks: a token that kept all of them
    # (and picked no null expert) has weights summing to exactly 1 (times the scale).
    if cfg.router_order == "topk_softmax" and cfg.router != "top_p":
      for t, ch in enumerate(choices):
        if all(r < e and (r, t) in got for r, _ in ch):
          np.testing.assert_allclose(sums[t], scale, rtol=1e-5, err_msg=f"token {t}")
  if len(dropped) == g:
    np.testing.assert_allclose(routing.metrics["dropped_fraction"], np.mean(dropped), atol=1e-6)
  if cfg.dropless:
    assert float(routing.metrics["dropped_fraction"]) == 0.0
    if cfg.router in ("topk", "shared_experts"):  # every token: exactly k real experts
      valid = np.asarray(routing.slot_valid)
      idx = np.asarray(routing.dispatch_index)
      for gi in range(g):
        counts = np.bincount(idx[gi][valid[gi]], minlength=s)
        np.testing.assert_array_equal(counts, k)


def check_top_p(routing, cfg: MoEConfig, logits: np.ndarray) -> None:
  """Without drops, each token's experts are the shortest descending-probability prefix
  whose mass reaches p (or top_k experts), up to float32 rounding."""
  if float(routing.metrics["dropped_fraction"]) != 0.0:
    return
  g, s, _ = logits.shape
  probs = ref.softmax(logits)
  for gi in range(g):
    got = slot_dict(routing, gi)
    for t in range(s):
      chosen = sorted((r for r, tt in got if tt == t), key=lambda r: -probs[gi, t, r])
      assert chosen, "top-p always selects the most probable expert"
      others = [r for r in range(cfg.num_experts) if r not in chosen]
      if others:  # added in descending probability
        assert min(probs[gi, t, chosen]) >= max(probs[gi, t, others]) - 1e-6
      mass = float(np.sum(probs[gi, t, chosen]))
      assert len(chosen) == cfg.top_k or mass >= cfg.top_p - 1e-5, (chosen, mass)
      assert mass - probs[gi, t, chosen[-1]] < cfg.top_p + 1e-5, "not the shortest prefix"


def check_expert_choice(routing, cfg: MoEConfig, logits: np.ndarray) -> None:
  """Each expert takes exactly C distinct tokens: those it scores highest."""
  g, s, e = logits.shape
  c = cfg.capacity(s)
  assert 1 <= c <= s
  assert np.all(np.asarray(routing.slot_valid)), "expert choice fills every slot"
  probs = ref.softmax(logits)  # [G, S, E]
  idx = np.asarray(routing.dispatch_index)
  w = np.asarray(routing.combine_weight, np.float64)
  for gi in range(g):
    for ei in range(e):
      tokens = idx[gi, ei]
      assert len(set(tokens.tolist())) == c
      np.testing.assert_allclose(w[gi, ei], probs[gi, tokens, ei], rtol=1e-5, atol=1e-6)
      rest = np.setdiff1d(np.arange(s), tokens)
      if rest.size:
        assert probs[gi, tokens, ei].min() >= probs[gi, rest, ei].max() - 1e-6
  assert float(routing.metrics["dropped_fraction"]) == 0.0
  assert float(routing.aux_losses["load_balance_loss"]) == 0.0


def check_routing(routing, cfg: MoEConfig, logits: np.ndarray) -> None:
  """All properties of `routing` = route(logits, cfg); logits f64[G, S, R] hold the float32
  values the router saw."""
  g, s, _ = logits.shape
  routing = jax.device_get(routing)  # numpy from here on (eager jax ops would compile)
  check_contract(routing, cfg, s, g)
  if cfg.router == "expert_choice":
    check_expert_choice(routing, cfg, logits)
  else:
    check_token_choice(routing, cfg, logits)
  if cfg.router == "top_p":
    check_top_p(routing, cfg, logits)


# ----------------------------------------------------------------------------------------
# Router properties
# ----------------------------------------------------------------------------------------


def router_case(data, router: str) -> None:
  jroute.clear_cache()  # every example compiles anew; keep memory bounded
  cfg = data.draw(moe_configs(router), label="cfg")
  g = data.draw(st.integers(1, 3), label="G")
  s = data.draw(st.integers(1, 16), label="S")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
  shape = (g, s, cfg.num_router_logits)
  cases = [(kind, jnp.float32) for kind in LOGIT_KINDS]
  cases += [(kind, jnp.bfloat16) for kind in BF16_KINDS]
  for kind, dtype in cases:
    logits = jnp.asarray(make_logits(kind, rng, shape), dtype)
    note(f"kind={kind} dtype={dtype.__name__} C={cfg.capacity(s)}")
    routing = jroute(logits, cfg)
    # The router sees exactly these values (bfloat16 -> float32 is exact).
    check_routing(routing, cfg, np.asarray(logits, np.float64))


@pytest.mark.parametrize(
  # By default plain top-k and expert choice (the most different); all with -m slow (and
  # 150 examples each in test_router_properties_long).
  "router",
  [
    r if r in ("topk", "expert_choice") else pytest.param(r, marks=pytest.mark.slow)
    for r in ALL_ROUTERS
  ],
)
@props(max_examples=3)
@given(data=st.data())
def test_router_properties(router, data):
  router_case(data, router)


@pytest.mark.slow
@pytest.mark.parametrize("router", ALL_ROUTERS)
@props(max_examples=150)
@given(data=st.data())
def test_router_properties_long(router, data):
  router_case(data, router)


def test_bfloat16_logits_route_like_their_float32_values():
  """Regression: bfloat16 logits used to give bfloat16 weights, losses and metrics (and a
  bfloat16 top-p mass); routers now upcast, so the routing equals float32 routing."""
  cfg = MoEConfig(
    router="top_p", num_experts=8, expert_d_ff=3, top_k=4, top_p=0.7, capacity_factor=1.0
  )
  logits = jnp.asarray(make_logits("gaussian", np.random.default_rng(0), (2, 16, 8)), jnp.bfloat16)
  got = jroute(logits, cfg)
  want = jroute(logits.astype(jnp.float32), cfg)
  for tree in (got.aux_losses, got.metrics):
    for v in jax.tree_util.tree_leaves(tree):
      assert v.dtype == jnp.float32
  chex.assert_trees_all_equal(got, want)


# ----------------------------------------------------------------------------------------
# MoE layer properties
# ----------------------------------------------------------------------------------------

D_MODEL = 4
LAYER_KINDS = ("gaussian", "zero_router", "one_column", "extreme", "tiny_set")


@functools.partial(jax.jit, static_argnums=(2, 3))
def layer_and_routing(params, x, cfg: MoEConfig, dtype):
  """(y, aux) of MoELayer(cfg, dtype) (mesh=None), its token groups [G, S, d], router
  logits [G, S, R] and their Routing."""
  y, aux = MoELayer(cfg, dtype=dtype).apply({"params": params}, x)
  groups = to_groups(jnp.asarray(x, dtype), cfg.group_size)  # [G, S, d]
  logits = jnp.einsum(
    "gsd,dr->gsr", groups.astype(jnp.float32), params["router"].astype(jnp.float32)
  )
  return y, aux, groups, logits, route(logits, cfg)


def layer_inputs(cfg: MoEConfig, kind: str, rng: np.random.Generator, shape, dtype):
  """x [B, L, d] and parameters; `kind` makes the routing degenerate:
  zero_router: all logits 0 (every expert ties); one_column: every token prefers one
  (real or null) expert by 1e4; extreme: logits in multiples of +-1e3 (exact ties and
  underflowing probabilities); tiny_set: small integer logits (exact ties)."""
  layer = MoELayer(cfg, dtype=dtype)
  integer = kind in ("extreme", "tiny_set")
  x = (rng.integers(-1, 2, shape) if integer else rng.standard_normal(shape)).astype(np.float32)
  if kind == "one_column":
    x[..., 0] = 1.0
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x))["params"])

  def fill(path, leaf):
    if path[-1].key != "router":
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2]), leaf.dtype)
    if kind == "zero_router":
      w = np.zeros(leaf.shape)
    elif kind == "one_column":
      w = 0.1 * rng.standard_normal(leaf.shape)
      w[0, rng.integers(leaf.shape[1])] = 1e4
    elif kind == "extreme":
      w = rng.choice([-1e3, 1e3], size=leaf.shape)
    elif kind == "tiny_set":
      w = rng.integers(-1, 2, leaf.shape).astype(np.float64)
    else:
      w = 2.0 * rng.standard_normal(leaf.shape)
    return jnp.asarray(w, leaf.dtype)

  return jnp.asarray(x), jax.tree_util.tree_map_with_path(fill, shapes)


def layer_reference(routing, groups, params, cfg: MoEConfig, x, dtype) -> np.ndarray:
  """y_t = sum_{valid (e, c): index = t} w_{e,c} FFN_e(x_t) [+ FFN_shared(x_t)], float64
  loops over the routing's slots, on the dtype-rounded inputs and weights the layer uses."""
  as64 = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)
  groups = np.asarray(groups, np.float64)
  w_gate, w_up, w_down = (as64(params[n]) for n in ("wi_gate", "wi_up", "wo"))
  idx, w, valid = (
    np.asarray(a) for a in (routing.dispatch_index, routing.combine_weight, routing.slot_valid)
  )
  y = np.zeros_like(groups)
  for g, e, c in zip(*np.nonzero(valid)):
    t = idx[g, e, c]
    y[g, t] += float(w[g, e, c]) * ref.gated_ffn_np(
      groups[g, t], w_gate[e], w_up[e], w_down[e], cfg.activation
    )
  y = y.reshape(x.shape)
  if cfg.num_shared_experts:
    sh = params["shared"]
    y = y + ref.gated_ffn_np(
      as64(x), as64(sh["wi_gate"]), as64(sh["wi_up"]), as64(sh["wo"]), cfg.activation
    )
  return y


def layer_case(data) -> None:
  layer_and_routing.clear_cache()
  cfg = data.draw(moe_configs(max_experts=6), label="cfg")
  b = data.draw(st.integers(1, 2), label="B")
  length = data.draw(st.integers(1, 8), label="L")
  n = b * length
  group_size = data.draw(
    st.sampled_from([None] + [d for d in range(1, n + 1) if n % d == 0]), label="group_size"
  )
  cfg = dataclasses.replace(cfg, group_size=group_size)
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]), label="dtype")
  kind = data.draw(st.sampled_from(LAYER_KINDS), label="kind")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
  x, params = layer_inputs(cfg, kind, rng, (b, length, D_MODEL), dtype)
  y, aux, groups, logits, routing = jax.device_get(layer_and_routing(params, x, cfg, dtype))
  chex.assert_shape(y, x.shape)
  assert y.dtype == dtype
  y = np.asarray(y, np.float64)
  assert np.all(np.isfinite(y))
  check_routing(routing, cfg, np.asarray(logits, np.float64))
  # The layer reports its routing's losses and metrics.
  chex.assert_trees_all_close(aux["aux_losses"], routing.aux_losses, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(aux["metrics"], routing.metrics, rtol=1e-6, atol=1e-6)
  expected = layer_reference(routing, groups, params, cfg, x, dtype)
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max()))
  if not cfg.num_shared_experts:  # tokens without a slot (dropped, or only null experts)
    served = np.zeros(groups.shape[:2], bool)
    idx, valid = np.asarray(routing.dispatch_index), np.asarray(routing.slot_valid)
    for g, e, c in zip(*np.nonzero(valid)):
      served[g, idx[g, e, c]] = True
    assert np.all(y.reshape(groups.shape)[~served] == 0.0)


@props(max_examples=5)
@given(data=st.data())
def test_layer_matches_per_token_reference(data):
  layer_case(data)


@pytest.mark.slow
@props(max_examples=200)
@given(data=st.data())
def test_layer_matches_per_token_reference_long(data):
  layer_case(data)


def test_tokens_routed_only_to_null_experts_output_zero():
  """AdaMoE: a null expert outputs zero, so a token whose top-k are all null experts gets
  exactly zero output, whatever the capacity. Regression: dropped_fraction was 1 here
  (1 - kept / max(selected, 1) with nothing selected); nothing was dropped."""
  cfg = MoEConfig(
    router="null_experts",
    num_experts=3,
    num_null_experts=2,
    top_k=2,
    expert_d_ff=3,
    capacity_factor=2.0,
  )
  x, params = layer_inputs(cfg, "gaussian", np.random.default_rng(0), (2, 5, D_MODEL), jnp.float32)
  x = x.at[..., 0].set(1.0)
  router = np.zeros(params["router"].shape, np.float32)
  router[0, 3:] = 1e4  # both null experts beat every real expert for every token
  params = dict(params, router=jnp.asarray(router))
  y, aux, _, _, routing = layer_and_routing(params, x, cfg, jnp.float32)
  assert not bool(jnp.any(routing.slot_valid))
  chex.assert_trees_all_equal(y, jnp.zeros_like(x))
  assert float(aux["metrics"]["experts_per_token"]) == 0.0
  assert float(aux["metrics"]["dropped_fraction"]) == 0.0


# ----------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------


def decimal_capacity(cfg: MoEConfig, s: int) -> int:
  """min(S, ceil(cf * S * k / E)) in decimal arithmetic on cf as written (repr)."""
  if cfg.dropless and cfg.router != "expert_choice":
    return s
  k = 1 if cfg.router == "expert_choice" else cfg.top_k
  with decimal.localcontext() as ctx:
    ctx.prec = 1000
    exact = decimal.Decimal(repr(float(cfg.capacity_factor))) * s * k / cfg.num_experts
    return min(s, int(exact.to_integral_value(rounding=decimal.ROUND_CEILING)))


@props(max_examples=300)
@given(cfg=moe_configs(), s=st.integers(1, 4096), factor=st.floats(1.0, 1e3))
def test_capacity_properties(cfg, s, factor):
  c = cfg.capacity(s)
  assert isinstance(c, int) and 1 <= c <= s
  assert c == decimal_capacity(cfg, s)
  # Monotone in the capacity factor and in the group size.
  bigger = dataclasses.replace(cfg, capacity_factor=min(cfg.capacity_factor * factor, 1e308))
  assert bigger.capacity(s) >= c
  assert cfg.capacity(s + 1) >= c
  # cf >= 1 means enough slots for every assignment (token choice) / token (expert choice).
  if cfg.capacity_factor >= 1 and not cfg.num_null_experts:
    k = 1 if cfg.router == "expert_choice" else cfg.top_k
    assert cfg.num_experts * c >= min(s * k, cfg.num_experts * s)


@pytest.mark.parametrize(
  "cf,s,k,e,expected",
  [
    (1e308, 16, 4, 8, 16),  # cf * S * k overflowed to inf: OverflowError
    (5e-324, 1, 1, 8, 1),  # cf * S * k / E underflowed to 0.0: C was 0
    (1.1, 200, 2, 8, 55),  # 1.1 * 200 * 2 / 8 = 55.00000000000001 in floats: C was 56
    (1.1, 200, 1, 4, 55),  # (also expert_choice: 1.1 * 200 / 4)
  ],
)
def test_capacity_regressions(cf, s, k, e, expected):
  assert MoEConfig(num_experts=e, top_k=k, capacity_factor=cf).capacity(s) == expected
  if k == 1:
    ec = MoEConfig(router="expert_choice", num_experts=e, top_k=1, capacity_factor=cf)
    assert ec.capacity(s) == expected


def test_zero_capacity_buffers_are_empty_and_harmless():
  """Configs cannot give C = 0 (capacity_factor > 0), but the slot machinery handles it."""
  g, s, e, k, d = 2, 5, 3, 2, 4
  idx = jnp.asarray(np.random.default_rng(0).integers(0, e, (g, s, k)), jnp.int32)
  dispatch_index, weight, valid, kept = assign_slots(
    idx, jnp.full((g, s, k), 0.5), jnp.ones((g, s, k), bool), e, 0
  )
  chex.assert_shape([dispatch_index, weight, valid], (g, e, 0))
  assert not bool(jnp.any(kept))
  x = jnp.ones((g, s, d))
  slots = dispatch(x, dispatch_index, valid)
  chex.assert_shape(slots, (g, e, 0, d))
  y = combine(slots, dispatch_index, weight, s)
  chex.assert_trees_all_equal(y, jnp.zeros((g, s, d)))


# ----------------------------------------------------------------------------------------
# Config fuzzing
# ----------------------------------------------------------------------------------------

NON_INTS = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none())
NON_NUMBERS = st.one_of(st.booleans(), st.text(max_size=3), st.none())
NEG_WEIGHTS = st.one_of(
  st.floats(max_value=0.0, exclude_max=True), st.sampled_from([math.inf, math.nan]), NON_NUMBERS
)
FIELDS = sorted(f.name for f in dataclasses.fields(MoEConfig) if f.name != "config_path")
PATHS = st.sampled_from(["moe", "model.moe", "layers.3.moe"])


def invalid_value(field: str, base: MoEConfig) -> st.SearchStrategy:
  """(field_to_blame, overrides) strategies making exactly one check of `base` fail."""
  total = base.num_router_logits
  not_in = lambda allowed: st.text(max_size=12).filter(lambda t: t not in allowed)
  table = {
    "num_experts": st.one_of(st.integers(max_value=0), NON_INTS),
    "expert_d_ff": st.one_of(st.integers(max_value=0), NON_INTS),
    "top_k": st.one_of(st.integers(max_value=0), st.integers(total + 1, total + 100), NON_INTS),
    "router": st.one_of(not_in(ROUTERS), st.none()),
    "router_order": not_in(ROUTER_ORDERS),
    "activation": not_in(ACTIVATIONS),
    "capacity_factor": st.one_of(
      st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan]), NON_NUMBERS
    ),
    "top_p": st.one_of(
      st.floats(max_value=0.0),
      st.floats(min_value=1.0, exclude_min=True),
      st.just(math.nan),
      NON_NUMBERS,
    ),
    "group_size": st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
    "load_balance_weight": NEG_WEIGHTS,
    "z_loss_weight": NEG_WEIGHTS,
    "dynamic_loss_weight": NEG_WEIGHTS,
    "num_shared_experts": st.integers(max_value=-1),
    "routed_scaling_factor": st.one_of(
      st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan]), NON_NUMBERS
    ),
    "expert_impl": not_in(EXPERT_IMPLS),
    "expert_block_size": st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
    "ep_exchange": not_in(EP_EXCHANGES),
    "ragged_buffer_factor": st.one_of(
      st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan]), NON_NUMBERS
    ),
    "ragged_buffer_min_rows": st.one_of(st.integers(max_value=0), NON_INTS),
    "dropless_windows": st.one_of(
      st.floats(),
      st.integers(),
      st.text(max_size=3),
      st.tuples(st.floats(max_value=0.0)),
      st.sampled_from([(1.5, 1.25), (1.0, 1.0), (math.nan,), (math.inf,), ("1.25",)]),
    ),
    # the methods' fields (compressed experts, multi-gate, pre-gating); bases never use them
    "num_compressed_experts": st.one_of(st.integers(max_value=-1), NON_INTS),
    "num_tasks": st.one_of(st.integers(max_value=-1), st.integers(1, 4), NON_INTS),
    "task_categories": st.one_of(
      st.lists(st.integers(0, 3), min_size=1).map(tuple), st.integers(), st.text(max_size=3)
    ),
    "num_category_experts": st.one_of(st.integers(max_value=-1), st.integers(1, 4), NON_INTS),
    "num_task_experts": st.one_of(st.integers(max_value=-1), st.integers(1, 4), NON_INTS),
    "pregate_d_hidden": st.one_of(st.integers(max_value=0), NON_INTS),
    # DeepSeek-V2/V3 routing and Qwen2 shared-expert fields; bases use their defaults
    "shared_expert_d_ff": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3)),
    "shared_expert_gate": st.one_of(st.integers(), st.text(max_size=3)),
    "n_group": st.one_of(st.integers(max_value=0), NON_INTS),
    "topk_group": st.one_of(st.integers(max_value=0), st.integers(2, 10), NON_INTS),
    "norm_topk_prob": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "bias_update_rate": NEG_WEIGHTS,
  }
  if field == "norm_topk_prob" and base.router != "deepseek_v3":
    table[field] = st.one_of(table[field], st.just(True))
  if field == "bias_update_rate" and base.router != "deepseek_v3":
    table[field] = st.one_of(table[field], st.floats(0.001, 1.0))
  if field == "num_compressed_experts" and base.router in ("expert_choice", "null_experts"):
    table[field] = st.one_of(table[field], st.integers(1, 3))
  if field == "routed_scaling_factor" and base.router != "shared_experts":
    # Any other value than 1 is invalid for routers that do not scale.
    table[field] = st.one_of(table[field], st.floats(0.01, 100).filter(lambda v: v != 1.0))
  if field == "num_null_experts":
    if base.router == "null_experts":
      return st.integers(max_value=0).map(lambda n: {"num_null_experts": n})
    # Null experts with a router that ignores them (top_k stays valid: E + N grows).
    return st.one_of(st.integers(max_value=-1), st.integers(1, 5)).map(
      lambda n: {"num_null_experts": n}
    )
  if field == "num_shared_experts" and base.router == "shared_experts":
    return st.integers(max_value=0).map(lambda n: {"num_shared_experts": n})
  if field == "dropless":
    return st.just({"dropless": True})
  return table[field].map(lambda v: {field: v})


@props(max_examples=400)
@given(data=st.data())
def test_invalid_config_raises_config_error_naming_the_field(data):
  field = data.draw(st.sampled_from(FIELDS), label="field")
  router = "expert_choice" if field == "dropless" else None
  base = data.draw(moe_configs(router), label="base")
  path = data.draw(PATHS, label="path")
  overrides = data.draw(invalid_value(field, base), label="overrides")
  values = {name: getattr(base, name) for name in FIELDS}
  values.update(overrides)
  with pytest.raises(ConfigError) as info:
    MoEConfig(**values, config_path=path)
  assert str(info.value).startswith(f"{path}.{field}="), str(info.value)
  with pytest.raises(ConfigError) as info:
    MoEConfig.from_config(values, path=path)
  assert str(info.value).startswith(f"{path}.{field}="), str(info.value)


@props(max_examples=100)
@given(
  base=moe_configs(),
  path=PATHS,
  key=st.text(min_size=1, max_size=12).filter(lambda t: t not in FIELDS),
  value=NON_INTS,
)
def test_unknown_config_field_is_a_config_error(base, path, key, value):
  values = {name: getattr(base, name) for name in FIELDS}
  values[key] = value
  with pytest.raises(ConfigError) as info:
    MoEConfig.from_config(values, path=path)
  assert str(info.value).startswith(f"{path}.{key}="), str(info.value)


@props(max_examples=100)
@given(cfg=moe_configs(), path=PATHS)
def test_valid_configs_round_trip_through_from_config(cfg, path):
  values = {name: getattr(cfg, name) for name in FIELDS}
  again = MoEConfig.from_config(ml_collections.ConfigDict(values), path=path)
  assert again == cfg and hash(again) == hash(cfg)
  assert again.config_path == path
