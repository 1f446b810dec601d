"""Scanned layers and remat policies: a scanned model with restacked params equals the
unrolled one (logits, aux, gradients); stack/unstack round-trip bit-exactly; the
save_a2a policy removes the all_to_alls full remat replays (counted in compiled HLO)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config import ModelConfig
from moejax.models import Transformer
from moejax.models.layer_stack import SCAN_KEY, scan_plan, stack_layers, unstack_layers
from moejax.moe_config import MoEConfig
from moejax.parallel import make_mesh, shard_params

B, L = 2, 12


def cfg(**kw) -> ModelConfig:
  base = dict(
    vocab_size=50,
    d_model=32,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_len=64,
    moe_every=2,
    first_moe_layer=1,
    moe=MoEConfig(
      num_experts=4,
      expert_d_ff=24,
      top_k=2,
      router="topk",
      dropless=True,
      router_order="topk_softmax",
    ),
  )
  base.update(kw)
  return ModelConfig(**base)


INTERLEAVED = dict()  # layer 0 dense, units (1 MoE, 2 dense), (3, 4), suffix layer 5
MLA_DEEPSEEK = dict(
  attention="mla",
  num_layers=4,
  moe_every=1,
  first_moe_layer=1,
  moe=MoEConfig(
    num_experts=4, expert_d_ff=8, top_k=2, router="shared_experts", num_shared_experts=1
  ),
)
DENSE = dict(moe_every=0, moe=None, num_layers=3)


def _tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (B, L), 0, 50)


@pytest.mark.parametrize(
  "kw",
  [
    pytest.param(INTERLEAVED, marks=pytest.mark.slow),
    pytest.param(MLA_DEEPSEEK, marks=pytest.mark.slow),
    DENSE,
  ],
  ids=["interleaved", "mla", "dense"],
)
def test_scanned_equals_unrolled(kw):
  unrolled_cfg = cfg(**kw)
  scanned_cfg = dataclasses.replace(unrolled_cfg, scan_layers=True)
  tokens = _tokens()
  params = jax.jit(Transformer(unrolled_cfg).init)(jax.random.key(1), tokens)["params"]
  params = jax.tree.map(
    lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
  )
  stacked = stack_layers(params, scanned_cfg)
  assert SCAN_KEY in stacked
  # The stacked tree is exactly what the scanned model creates.
  abstract = jax.eval_shape(Transformer(scanned_cfg).init, jax.random.key(1), tokens)["params"]
  abstract = jax.tree.map(
    lambda x: getattr(x, "value", x), abstract, is_leaf=lambda x: hasattr(x, "value")
  )
  assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
  chex.assert_trees_all_equal_shapes(abstract, stacked)

  def loss(model_cfg, p):
    logits, aux = Transformer(model_cfg).apply({"params": p}, tokens)
    return jnp.mean(logits**2) + sum(aux["aux_losses"].values(), 0.0), (logits, aux)

  value_and_grad = jax.jit(jax.value_and_grad(loss, 1, has_aux=True), static_argnums=0)
  (l1, (logits1, aux1)), g1 = value_and_grad(unrolled_cfg, params)
  (l2, (logits2, aux2)), g2 = value_and_grad(scanned_cfg, stacked)
  np.testing.assert_allclose(logits2, logits1, rtol=1e-5, atol=1e-5)
  assert (
    sorted(aux2["metrics"])
    == sorted(aux1["metrics"])
    == [f"layers_{i}" for i in unrolled_cfg.moe_layers]
  )
  chex.assert_trees_all_close(aux2, aux1, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(unstack_layers(g2, scanned_cfg), g1, rtol=1e-4, atol=1e-6)


def test_stack_unstack_round_trip_is_exact_and_reaches_optimizer_state():
  import optax

  model_cfg = cfg(scan_layers=True)
  plan = scan_plan(model_cfg)
  assert (plan.start, plan.unit, plan.num_units) == (1, 2, 2)
  params = jax.jit(Transformer(cfg()).init)(jax.random.key(0), _tokens())["params"]
  params = jax.tree.map(
    lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
  )
  opt = optax.adamw(1e-3).init(params)
  stacked = stack_layers((params, opt), model_cfg)
  assert stacked[0][SCAN_KEY]["block_0"]["ffn"]["wi_gate"].shape[0] == 2
  assert SCAN_KEY in stacked[1][0].mu and "layers_5" in stacked[1][0].mu
  back = unstack_layers(stacked, model_cfg)
  chex.assert_trees_all_equal((params, opt), back)
  # Idempotent on the form it already has.
  chex.assert_trees_all_equal(stack_layers(stacked, model_cfg), stacked)
  chex.assert_trees_all_equal(unstack_layers(params, model_cfg), params)


def _count_all_to_alls(policy: str, scan: bool) -> int:
  """all-to-all ops in the compiled gradient of an expert-parallel 2-layer MoE model."""
  mesh = make_mesh({"data": 2, "expert": 4, "model": 1})
  model_cfg = cfg(
    num_layers=2, moe_every=1, first_moe_layer=0, remat_policy=policy, scan_layers=scan
  )
  model = Transformer(model_cfg, mesh=mesh)
  tokens = jax.device_put(
    jnp.zeros((8, L), jnp.int32), NamedSharding(mesh, P(("data", "expert"), None))
  )
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens[:1])["params"]
  params = shard_params(
    jax.tree.map(
      lambda x: getattr(x, "value", x),
      jax.jit(Transformer(model_cfg).init)(jax.random.key(0), tokens[:1])["params"],
      is_leaf=lambda x: hasattr(x, "value"),
    ),
    mesh,
    logical_specs=boxed,
  )
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  # Activation exchanges only: the dropless row exchange also sends each row's local expert
  # id in a small int32 all_to_all, which carries no gradient.
  return sum(
    1
    for line in hlo.splitlines()
    if " all-to-all(" in line
    and ("f32[" in line.split(" all-to-all(")[0] or "bf16[" in line.split(" all-to-all(")[0])
  )


A2A_PER_LAYER = {"none": 4, "full": 6, "save_a2a": 4, "minimal": 6}


@pytest.mark.parametrize(
  "scan,policies",
  [
    pytest.param(False, tuple(A2A_PER_LAYER), marks=pytest.mark.slow),
    (True, ("full", "save_a2a")),
    pytest.param(True, ("none", "minimal"), marks=pytest.mark.slow),
  ],
  ids=["unrolled", "scanned", "scanned-others"],
)
def test_save_a2a_policy_removes_replayed_all_to_alls(scan, policies):
  """Forward 2 + backward 2 per MoE layer; full remat replays the forward's 2 (6)."""
  per_body = 1 if scan else 2  # a scanned body is one MoE layer in the HLO text
  for policy in policies:
    assert _count_all_to_alls(policy, scan) == A2A_PER_LAYER[policy] * per_body, policy


@pytest.mark.parametrize(
  # 'full' (= remat=True) is also checked by default in test_model.py.
  "policy",
  [
    pytest.param("full", marks=pytest.mark.slow),
    "minimal",
    pytest.param("save_a2a", marks=pytest.mark.slow),
  ],
)
def test_remat_policies_keep_gradients(policy):
  model_cfg = cfg(num_layers=2, moe_every=1, first_moe_layer=0)
  tokens = _tokens()
  params = jax.jit(Transformer(model_cfg).init)(jax.random.key(1), tokens)["params"]
  loss = lambda c, p: jnp.mean(Transformer(c).apply({"params": p}, tokens)[0] ** 2)
  grad = jax.jit(jax.grad(loss, 1), static_argnums=0)
  ref = grad(model_cfg, params)
  got = grad(dataclasses.replace(model_cfg, remat_policy=policy), params)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-7)


def test_old_remat_flag_means_full():
  assert cfg(remat=True).remat_mode == "full"
  assert cfg().remat_mode == "none"
  assert cfg(remat=True, remat_policy="save_a2a").remat_mode == "save_a2a"
