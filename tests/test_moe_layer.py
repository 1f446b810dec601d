"""MoELayer / DenseFFN against a naive per-token loop reference (tests/reference.py)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.ffn import DenseFFN, gated_ffn
from moejax.layers.moe import MoELayer
from moejax.moe_config import MoEConfig
from moejax.routers import route
from tests.helpers import make_moe_cfg, random_like

try:
  from tests import reference as ref
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
  import reference as ref

B, L, D, E, F = 2, 8, 6, 4, 5

# name -> (MoEConfig kwargs, x shape). Small, but each exercises its router's distinctive
# behaviour (drops, null tokens, shared FFN, varying experts per token, groups across rows).
CASES = {
  "topk_drop_silu": dict(router="topk", top_k=2, capacity_factor=0.75),
  "topk_renorm_gelu": dict(
    router="topk", top_k=2, router_order="topk_softmax", activation="gelu", capacity_factor=1.0
  ),
  "topk_k1_groups": dict(router="topk", top_k=1, capacity_factor=1.0, group_size=4),
  "topk_dropless": dict(router="topk", top_k=3, dropless=True),
  "expert_choice": dict(router="expert_choice", capacity_factor=1.5),
  "expert_choice_groups": dict(router="expert_choice", capacity_factor=1.0, group_size=16),
  "null_experts": dict(router="null_experts", num_null_experts=3, top_k=2, capacity_factor=1.0),
  "shared_experts": dict(
    router="shared_experts", num_shared_experts=2, top_k=2, capacity_factor=1.0, activation="gelu"
  ),
  "top_p": dict(router="top_p", top_k=3, top_p=0.6, capacity_factor=1.0),
}


def make_cfg(**kw) -> MoEConfig:
  return make_moe_cfg(**{"num_experts": E, "expert_d_ff": F, **kw})


def default_first(names, default=("topk_drop_silu", "expert_choice")):
  """`names` as params: plain top-k and expert choice (the most different router) run by
  default, the other routers' variants under ``-m slow``."""
  return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in names]


def init_params(layer, x, seed, router_scale=1.0):
  """`layer`'s parameters replaced by random N(0, 1/fan_in) draws (larger router weights than
  the default init, so routing decisions have clear margins)."""
  return random_like(
    nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"]), seed, router_scale
  )


def reference_kwargs(cfg: MoEConfig) -> dict:
  return dict(
    router=cfg.router,
    num_experts=cfg.num_experts,
    k=cfg.top_k,
    cf=cfg.capacity_factor,
    dropless=cfg.dropless,
    order=cfg.router_order,
    p=cfg.top_p,
    activation=cfg.activation,
    group_size=cfg.group_size,
  )


def to_np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def random_x(seed, shape=(B, L, D)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_per_token_loop_reference(name):
  cfg = make_cfg(**CASES[name])
  layer = MoELayer(cfg)
  apply = jax.jit(layer.apply)
  for seed in range(2):
    x = random_x(seed)
    params = init_params(layer, x, seed=seed + 1)
    y, aux = apply({"params": params}, x)
    chex.assert_shape(y, (B, L, D))
    assert y.dtype == jnp.float32
    expected, routing = ref.moe_layer_reference(
      np.asarray(x), to_np(params), **reference_kwargs(cfg)
    )
    chex.assert_trees_all_close(y, expected.astype(np.float32), rtol=1e-4, atol=1e-5)
    assert set(aux) == {"aux_losses", "metrics"}
    expected_losses = {"load_balance_loss", "z_loss"} | (
      {"dynamic_loss"} if cfg.router == "top_p" else set()
    )
    assert set(aux["aux_losses"]) == expected_losses
    dropped = np.mean([(n - len(kept)) / max(n, 1) for kept, n, _ in routing])
    np.testing.assert_allclose(aux["metrics"]["dropped_fraction"], dropped, atol=1e-6)
    if name == "topk_drop_silu":
      assert dropped > 0, "this case must exercise capacity dropping"
    if name == "top_p":
      sizes = {len(c) for _, _, choices in routing for c in choices}
      assert len(sizes) > 1, "top_p case must have a varying number of experts per token"


def test_shared_experts_output_is_shared_ffn_plus_routed():
  cfg = make_cfg(**CASES["shared_experts"])
  layer = MoELayer(cfg)
  x = random_x(3)
  params = init_params(layer, x, seed=3)
  y, _ = jax.jit(layer.apply)({"params": params}, x)
  sh = params["shared"]
  chex.assert_shape(sh["wi_gate"], (D, 2 * F))  # num_shared_experts * expert_d_ff wide
  shared = gated_ffn(x, sh["wi_gate"], sh["wi_up"], sh["wo"], cfg.activation)
  # The routed part alone: the same layer with the shared FFN zeroed out.
  zero_shared = dict(params, shared=jax.tree_util.tree_map(jnp.zeros_like, sh))
  routed, _ = jax.jit(layer.apply)({"params": zero_shared}, x)
  chex.assert_trees_all_close(y, shared + routed, rtol=1e-5, atol=1e-6)
  # ... and the routed part is a top-k layer over the fine-grained experts.
  topk_layer = MoELayer(
    make_cfg(**dict(CASES["shared_experts"], router="topk", num_shared_experts=0))
  )
  no_shared = {k: v for k, v in params.items() if k != "shared"}
  topk_y, _ = jax.jit(topk_layer.apply)({"params": no_shared}, x)
  chex.assert_trees_all_close(routed, topk_y, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(shared))) > 0.1


def test_tokens_routed_only_to_null_experts_get_zero_output():
  cfg = make_cfg(router="null_experts", num_null_experts=2, top_k=2, capacity_factor=2.0)
  layer = MoELayer(cfg)
  x = np.random.default_rng(4).standard_normal((B, L, D)).astype(np.float32)
  null_tokens = np.zeros((B, L), bool)
  null_tokens[:, ::3] = True
  x[..., 0] = np.where(null_tokens, 1.0, -1.0)  # feature 0 flags the null tokens
  params = init_params(layer, jnp.asarray(x), seed=4)
  router = np.asarray(params["router"]).copy()
  router[0, E:] = 20.0  # +20 on both null logits for flagged tokens, -20 for the others
  params["router"] = jnp.asarray(router)
  y, aux = jax.jit(layer.apply)({"params": params}, jnp.asarray(x))
  y = np.asarray(y)
  assert np.all(y[null_tokens] == 0.0)
  assert np.all(np.abs(y[~null_tokens]).sum(-1) > 0)
  # Null tokens occupy no slot: experts_per_token counts only the real-expert tokens.
  np.testing.assert_allclose(
    aux["metrics"]["experts_per_token"], 2 * np.mean(~null_tokens), rtol=1e-6
  )


@pytest.mark.parametrize(
  "name",
  default_first(
    ["topk_drop_silu", "expert_choice", "null_experts", "shared_experts", "top_p"],
    default=("topk_drop_silu", "expert_choice", "shared_experts"),  # + the shared FFN's grads
  ),
)
def test_gradients_flow(name):
  cfg = make_cfg(**CASES[name])
  layer = MoELayer(cfg)
  x = np.random.default_rng(5).standard_normal((B, L, D)).astype(np.float32)
  x[..., 0] = 1.0  # a constant feature, used to switch expert E-1 off via the router
  x = jnp.asarray(x)
  params = init_params(layer, x, seed=5)
  router = np.asarray(params["router"]).copy()
  router[0, E - 1] = -30.0  # expert E-1 never wins (for expert_choice: it only gets
  params["router"] = jnp.asarray(router)  # tokens with tiny weight, see below)
  cot = jnp.asarray(np.random.default_rng(6).standard_normal((B, L, D)), jnp.float32)

  def loss(p):
    y, _ = layer.apply({"params": p}, x)
    return jnp.sum(y * cot)

  grads = jax.jit(jax.grad(loss))(params)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert float(jnp.linalg.norm(grads["router"])) > 1e-4
  for wname in ("wi_gate", "wi_up", "wo"):
    per_expert = np.linalg.norm(np.asarray(grads[wname]).reshape(E, -1), axis=1)
    assert np.all(per_expert[: E - 1] > 1e-4), (wname, per_expert)
    if cfg.router != "expert_choice":  # a token-choice expert nobody picks gets no gradient
      assert per_expert[E - 1] == 0.0, (wname, per_expert)
  if cfg.num_shared_experts:
    assert all(float(jnp.linalg.norm(g)) > 1e-4 for g in jax.tree_util.tree_leaves(grads["shared"]))


@pytest.mark.parametrize(
  "name",
  default_first(["topk_drop_silu", "topk_renorm_gelu", "expert_choice", "null_experts", "top_p"]),
)
def test_gradient_matches_finite_differences(name):
  cfg = make_cfg(**dict(CASES[name], load_balance_weight=0.1, z_loss_weight=0.1))
  with jax.enable_x64(True):
    layer = MoELayer(cfg, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((B, L, D)), jnp.float64)
    params = init_params(layer, x, seed=7)
    cot = jnp.asarray(np.random.default_rng(8).standard_normal((B, L, D)), jnp.float64)

    def loss(p):
      y, aux = layer.apply({"params": p}, x)
      return jnp.sum(y * cot) + sum(aux["aux_losses"].values())

    @jax.jit
    def routing_jit(p):
      logits = jnp.einsum("bld,dr->blr", x, p["router"]).astype(jnp.float32)
      r = route(logits.reshape(-1, cfg.group_size or L, cfg.num_router_logits), cfg)
      return r.dispatch_index, r.slot_valid

    def routing_of(p):  # the discrete routing decision, which FD must not cross
      return tuple(np.asarray(a) for a in routing_jit(p))

    grad = jax.jit(jax.grad(loss))(params)
    loss_fn = jax.jit(loss)
    rng = np.random.default_rng(9)
    eps = 1e-3
    checked = 0
    for _ in range(20):  # random directions; skip those whose FD step crosses a routing boundary
      if checked == 3:
        break
      direction = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params
      )
      plus = jax.tree_util.tree_map(lambda p, v: p + eps * v, params, direction)
      minus = jax.tree_util.tree_map(lambda p, v: p - eps * v, params, direction)
      if not all(np.array_equal(a, b) for a, b in zip(routing_of(plus), routing_of(minus))):
        continue
      checked += 1
      fd = (float(loss_fn(plus)) - float(loss_fn(minus))) / (2 * eps)
      analytic = sum(
        float(jnp.vdot(g, v))
        for g, v in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction))
      )
      # Router logits are computed in float32 inside the layer, hence the tolerance.
      np.testing.assert_allclose(analytic, fd, rtol=2e-3, atol=2e-3)
    assert checked == 3, "too few routing-preserving directions"
    # The router gradient alone, so a wrong router gradient cannot hide in the sum.
    for _ in range(20):
      v = jnp.asarray(rng.standard_normal(params["router"].shape))
      plus = dict(params, router=params["router"] + eps * v)
      minus = dict(params, router=params["router"] - eps * v)
      if all(np.array_equal(a, b) for a, b in zip(routing_of(plus), routing_of(minus))):
        break
    else:
      pytest.fail("no routing-preserving router direction found")
    fd = (float(loss_fn(plus)) - float(loss_fn(minus))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(grad["router"], v)), fd, rtol=5e-3, atol=2e-3)
    assert abs(fd) > 1e-2


@pytest.mark.parametrize(
  "name", default_first(["topk_drop_silu", "expert_choice", "shared_experts", "top_p"])
)
def test_jit_matches_eager(name):
  cfg = make_cfg(**CASES[name])
  layer = MoELayer(cfg)
  x = random_x(10)
  params = {"params": init_params(layer, x, seed=10)}
  y_eager, aux_eager = layer.apply(params, x)
  y_jit, aux_jit = jax.jit(layer.apply)(params, x)
  chex.assert_trees_all_close((y_eager, aux_eager), (y_jit, aux_jit), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "name",
  default_first(["topk_drop_silu", "expert_choice", "null_experts", "shared_experts", "top_p"]),
)
def test_bf16_compute_is_close_to_f32(name):
  cfg = make_cfg(**CASES[name])
  x = random_x(11)
  params = {"params": init_params(MoELayer(cfg), x, seed=11, router_scale=3.0)}
  y32, _ = jax.jit(MoELayer(cfg).apply)(params, x)
  y16, aux16 = jax.jit(MoELayer(cfg, dtype=jnp.bfloat16).apply)(params, x)
  assert y16.dtype == jnp.bfloat16
  for leaf in jax.tree_util.tree_leaves(aux16):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  y16 = np.asarray(y16, np.float32)
  scale = float(np.max(np.abs(np.asarray(y32))))
  assert scale > 0.1
  np.testing.assert_allclose(y16, np.asarray(y32), atol=0.03 * scale, rtol=0.03)


def test_group_size_must_divide_tokens():
  cfg = make_cfg(router="topk", group_size=5)
  x = random_x(12)  # 2 x 8 = 16 tokens
  with pytest.raises(ValueError, match="group_size"):
    jax.jit(MoELayer(cfg).init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match="batch, length, d_model"):
    jax.jit(MoELayer(make_cfg()).init)(jax.random.key(0), x[0])


def test_group_size_changes_routing_groups():
  # With drops, grouping matters: groups of 4 tokens have their own capacity.
  cfg_seq = make_cfg(router="topk", top_k=1, capacity_factor=1.0)
  cfg_grp = make_cfg(router="topk", top_k=1, capacity_factor=1.0, group_size=4)
  x = random_x(13)
  params = {"params": init_params(MoELayer(cfg_seq), x, seed=13, router_scale=3.0)}
  y_seq, _ = jax.jit(MoELayer(cfg_seq).apply)(params, x)
  y_grp, _ = jax.jit(MoELayer(cfg_grp).apply)(params, x)
  for cfg, y in ((cfg_seq, y_seq), (cfg_grp, y_grp)):
    expected, _ = ref.moe_layer_reference(
      np.asarray(x), to_np(params["params"]), **reference_kwargs(cfg)
    )
    chex.assert_trees_all_close(y, expected.astype(np.float32), rtol=1e-4, atol=1e-5)
  assert not np.allclose(y_seq, y_grp)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_dense_ffn_equals_gated_ffn(activation):
  x = random_x(14, (3, 5, D))
  layer = DenseFFN(d_ff=7, activation=activation)
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])
  chex.assert_shape([params["wi_gate"], params["wi_up"]], (D, 7))
  chex.assert_shape(params["wo"], (7, D))
  y, aux = layer.apply({"params": params}, x)
  assert aux == {"aux_losses": {}, "metrics": {}}
  chex.assert_shape(y, (3, 5, D))
  expected = gated_ffn(x, params["wi_gate"], params["wi_up"], params["wo"], activation)
  chex.assert_trees_all_close(y, expected, rtol=1e-6, atol=1e-6)
  np_ref = ref.gated_ffn_np(
    np.asarray(x), *(np.asarray(params[k]) for k in ("wi_gate", "wi_up", "wo")), activation
  )
  chex.assert_trees_all_close(y, np_ref.astype(np.float32), rtol=1e-4, atol=1e-5)
  # bf16 compute keeps the interface and stays close.
  y16, _ = DenseFFN(d_ff=7, activation=activation, dtype=jnp.bfloat16).apply({"params": params}, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y), atol=5e-2, rtol=5e-2)
