"""The expert-parallel MoE layer (shard_map + all_to_all) equals the unsharded layer.

Every router on every mesh shape of the 8 simulated CPU devices: outputs, aux losses,
metrics and gradients (w.r.t. params and input) of ``MoELayer(cfg, mesh=mesh)`` under
``jax.jit`` with params placed by the logical-axis rules, against ``MoELayer(cfg)``.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.errors import ConfigError
from moejax.layers.expert_parallel import all_to_all_experts
from moejax.layers.moe import MoELayer
from moejax.moe_config import MoEConfig
from moejax.parallel import make_mesh, params_shardings, shard_params
from tests.helpers import covering_params, make_moe_cfg, random_like

D, F, E = 16, 32, 8
X_SHAPE = (4, 32, D)  # 128 tokens: 16 groups of 8 (or 8 groups of 16)

ROUTERS = {
  "topk_capacity": dict(router="topk", top_k=2, capacity_factor=0.75, group_size=8),
  "topk_dropless": dict(
    router="topk", top_k=2, dropless=True, group_size=8, router_order="topk_softmax"
  ),
  "expert_choice": dict(router="expert_choice", capacity_factor=2.0, group_size=16),
  "null_experts": dict(
    router="null_experts", num_null_experts=4, top_k=2, capacity_factor=1.0, group_size=8
  ),
  "shared_experts": dict(
    router="shared_experts",
    num_shared_experts=2,
    top_k=2,
    capacity_factor=1.0,
    group_size=8,
    activation="gelu",
  ),
  "top_p": dict(
    router="top_p", top_k=3, top_p=0.6, capacity_factor=1.0, group_size=8, dynamic_loss_weight=0.01
  ),
  "deepseek_v3": dict(  # sigmoid + random selection bias + group-limited, capacity-limited
    router="deepseek_v3",
    num_shared_experts=1,
    top_k=3,
    capacity_factor=1.0,
    group_size=8,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
  ),
}

# (data, expert, model); (1, 1, 1) runs on jax.devices()[:1].
MESHES = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1), (2, 2, 2), (1, 1, 1)]


def make_cfg(**kw) -> MoEConfig:
  return make_moe_cfg(**{"num_experts": E, "expert_d_ff": F, "config_path": "model.moe", **kw})


def mesh_of(shape):
  devices = jax.devices()[: int(np.prod(shape))]
  return make_mesh(dict(zip(("data", "expert", "model"), shape)), devices=devices)


def random_boxed_params(cfg: MoEConfig, seed: int):
  """model.init's boxed tree with every value replaced by N(0, 1/fan_in) draws; router
  weights 4x larger so routing decisions have clear margins (no near-ties to flip)."""
  boxed = jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), jnp.zeros(X_SHAPE))["params"]
  return random_like(boxed, seed, router_scale=4.0)


def loss_and_grads(layer: MoELayer):
  """jit(value_and_grad) of L = sum(y * ct) + sum(aux losses), also returning y and aux."""

  def loss(params, x, ct):
    y, aux = layer.apply({"params": params}, x)
    return jnp.sum(y * ct) + sum(aux["aux_losses"].values()), (y, aux)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def inputs(seed: int = 1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32)
  ct = jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32)
  return x, ct


@functools.cache
def reference(name: str):
  """The unsharded layer's (loss, (y, aux)), grads as float64 numpy trees."""
  cfg = make_cfg(**ROUTERS[name])
  params = nn.meta.unbox(random_boxed_params(cfg, seed=3))
  return jax.tree.map(
    lambda a: np.asarray(a, np.float64), loss_and_grads(MoELayer(cfg))(params, *inputs())
  )


def run_sharded(cfg: MoEConfig, shape, seed: int = 3):
  mesh = mesh_of(shape)
  params = nn.meta.unbox(shard_params(random_boxed_params(cfg, seed), mesh))
  fn = loss_and_grads(MoELayer(cfg, mesh=mesh))
  return fn, params, fn(params, *inputs())


def assert_close(actual, expected, rtol=1e-5):
  """Leafwise |a - e| <= rtol * (|e| + max(1, max|e|)): ~1e-5 of each leaf's scale."""
  chex.assert_trees_all_equal_shapes(actual, expected)

  def check(path, a, e):
    e = np.asarray(e, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(
      np.asarray(a, np.float64), e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )

  jax.tree_util.tree_map_with_path(check, actual, expected)


@pytest.mark.parametrize(
  # By default: top-k (capacity drops) on the expert axis alone, expert choice on data x
  # expert, shared experts (a replicated FFN beside the routed ones) on data x expert x model.
  "name,shape",
  covering_params(
    ROUTERS,
    MESHES,
    fast={
      ("topk_capacity", (1, 8, 1)),
      ("expert_choice", (4, 2, 1)),
      ("shared_experts", (2, 2, 2)),
    },
  ),
)
def test_sharded_layer_equals_unsharded(name, shape):
  cfg = make_cfg(**ROUTERS[name])
  _, _, got = run_sharded(cfg, shape)
  (loss, (y, aux)), (g_params, g_x) = got
  (ref_loss, (ref_y, ref_aux)), (ref_g_params, ref_g_x) = reference(name)
  assert_close(y, ref_y)
  assert_close(aux, ref_aux)
  assert_close(g_params, ref_g_params)
  assert_close(g_x, ref_g_x)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert set(aux["aux_losses"]) == set(ref_aux["aux_losses"])
  assert set(aux["metrics"]) == set(ref_aux["metrics"])


def test_cases_exercise_their_router_features():
  """Guards the test's own power: drops happen where capacity binds, not when dropless,
  null experts leave tokens with fewer real experts, and shared experts exist."""
  # deepseek_v3's cases are all slow; its reference compile stays out of the default suite.
  metrics = {name: reference(name)[0][1][1]["metrics"] for name in ROUTERS if name != "deepseek_v3"}
  assert metrics["topk_capacity"]["dropped_fraction"] > 0.05
  assert metrics["topk_dropless"]["dropped_fraction"] == 0.0
  assert metrics["null_experts"]["experts_per_token"] < 2.0
  assert 1.0 <= metrics["top_p"]["experts_per_token"] < 3.0
  grads = reference("shared_experts")[1][0]
  assert "shared" in grads and np.any(grads["shared"]["wi_gate"] != 0)


@pytest.mark.parametrize(
  "shape", [pytest.param((2, 4, 1), marks=pytest.mark.slow), (1, 4, 2)], ids=["2x4x1", "1x4x2"]
)
def test_several_experts_per_device(shape):
  """E=16 on expert=4: 4 experts per device (and a split hidden width on model=2)."""
  cfg = make_cfg(router="topk", num_experts=16, top_k=2, capacity_factor=1.0, group_size=8)
  params = nn.meta.unbox(random_boxed_params(cfg, seed=5))
  ref = loss_and_grads(MoELayer(cfg))(params, *inputs())
  _, sharded_params, got = run_sharded(cfg, shape, seed=5)
  assert sharded_params["wi_gate"].sharding.shard_shape((16, D, F)) == (4, D, F // shape[2])
  assert_close(got, jax.tree.map(lambda a: np.asarray(a, np.float64), ref))


def test_compiled_step_contains_all_to_all():
  cfg = make_cfg(**ROUTERS["topk_capacity"])
  fn, params, _ = run_sharded(cfg, (2, 4, 1))
  hlo = fn.lower(params, *inputs()).compile().as_text()
  assert "all-to-all" in hlo


def test_all_to_all_experts_applies_each_expert_to_its_slots():
  """all_to_all_experts inside shard_map == every expert e applied to slots [:, e]
  (slots go to the right device and come back in place; f split over model=2)."""
  mesh = mesh_of((1, 4, 2))
  cfg = make_cfg(router="topk", num_experts=E, top_k=2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, E, 3, D)), jnp.float32)  # [G, E, C, d]
  w_in = jnp.asarray(rng.standard_normal((2, E, D, F)) / np.sqrt(D), jnp.float32)
  w_down = jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(F), jnp.float32)
  fn = jax.jit(
    jax.shard_map(
      all_to_all_experts(cfg),
      mesh=mesh,
      in_specs=(
        P(("data", "expert")),
        P("expert", None, "model"),
        P("expert", None, "model"),
        P("expert", "model", None),
      ),
      out_specs=P(("data", "expert")),
    )
  )
  got = fn(x, w_in[0], w_in[1], w_down)
  h = jax.nn.silu(jnp.einsum("gecd,edf->gecf", x, w_in[0])) * jnp.einsum(
    "gecd,edf->gecf", x, w_in[1]
  )
  want = jnp.einsum("gecf,efd->gecd", h, w_down)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _trace(cfg: MoEConfig, shape, x_shape=X_SHAPE):
  mesh = mesh_of(shape)
  layer = MoELayer(cfg, mesh=mesh)
  x = jnp.zeros(x_shape, jnp.float32)
  params = jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), x)["params"]
  jax.eval_shape(layer.apply, {"params": nn.meta.unbox(params)}, x)


def test_indivisible_groups_name_group_size():
  cfg = make_cfg(router="topk", group_size=32)  # 128 tokens -> 4 groups on 8 shards
  with pytest.raises(
    ConfigError,
    match=r"model\.moe\.group_size=32 is invalid.*4 routing "
    r"groups.*8 token shards",
  ):
    _trace(cfg, (2, 4, 1))


def test_indivisible_sequences_name_global_batch_size():
  cfg = make_cfg(router="topk", group_size=None)  # one group per sequence: 4 groups
  with pytest.raises(ConfigError, match=r"data\.global_batch_size=4 is invalid"):
    _trace(cfg, (4, 2, 1))


def test_indivisible_experts_and_hidden_width_name_fields():
  with pytest.raises(ConfigError, match=r"model\.moe\.num_experts=6 is invalid.*mesh\.expert"):
    _trace(make_cfg(router="topk", num_experts=6, group_size=8), (2, 4, 1))
  with pytest.raises(ConfigError, match=r"model\.moe\.expert_d_ff=30 is invalid.*mesh\.model"):
    _trace(make_cfg(router="topk", expert_d_ff=30, group_size=8), (1, 2, 4))


def test_params_placed_by_rules_match_shard_map_specs():
  """The logical rules place expert kernels exactly as the shard_map in_specs expect, so
  no resharding is needed at the layer boundary."""
  mesh = mesh_of((2, 2, 2))
  cfg = make_cfg(router="shared_experts", num_shared_experts=2, group_size=8)
  abstract = jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), jnp.zeros(X_SHAPE, jnp.float32))[
    "params"
  ]
  specs = jax.tree.map(lambda s: s.spec, params_shardings(abstract, mesh))
  assert specs["wi_gate"] == P("expert", None, "model")
  assert specs["wi_up"] == P("expert", None, "model")
  assert specs["wo"] == P("expert", "model", None)
  assert specs["router"] == P(None, None)
  assert specs["shared"]["wi_gate"] == P(None, "model")
