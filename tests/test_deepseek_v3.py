"""DeepSeek-V3 routing (sigmoid, selection bias, group-limited top-k, sequence-wise balance
loss), DeepSeek-V2 group_limited_greedy, and the aux-loss-free bias update in the train step,
against float64 numpy references written from the papers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.config import ModelConfig
from moejax.errors import ConfigError
from moejax.models import Transformer
from moejax.routers import route, update_router_bias
from moejax.training.state import TrainState
from moejax.training.step import make_train_step
from tests.helpers import init_model_params, make_moe_cfg


def v3_cfg(**kw):
  base = dict(
    num_experts=8,
    top_k=3,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    dropless=True,
    load_balance_weight=0.1,
    z_loss_weight=0.0,
  )
  return make_moe_cfg("deepseek_v3", **{**base, **kw})


def ref_v3_token(u, b, e, k, n_group, topk_group, norm, scale):
  """One token, float64, DeepSeek-V3 Sec. 2.1.2: -> (sorted chosen experts, {expert: gate})."""
  s = 1.0 / (1.0 + np.exp(-u))
  choice = s + b
  per = e // n_group
  groups = [sorted(choice[g * per : (g + 1) * per])[-2:] for g in range(n_group)]
  best = np.argsort([-sum(v) for v in groups], kind="stable")[:topk_group]
  allowed = [i for i in range(e) if i // per in best]
  chosen = sorted(allowed, key=lambda i: -choice[i])[:k]
  g = np.array([s[i] for i in chosen])
  if norm:
    g = g / g.sum()
  return sorted(chosen), {i: scale * gi for i, gi in zip(chosen, g)}


@pytest.mark.parametrize("norm", [True, False])
def test_v3_router_matches_reference(norm):
  cfg = v3_cfg(norm_topk_prob=norm)
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 16, 8)) * 2
  bias = rng.standard_normal(8) * 0.3  # large enough to change selections
  routing = jax.jit(lambda x, b: route(x, cfg, slots=False, bias=b))(
    jnp.asarray(logits, jnp.float32), jnp.asarray(bias, jnp.float32)
  )
  idx, w = np.asarray(routing.expert_index), np.asarray(routing.weight)
  changed = 0
  for g in range(2):
    for t in range(16):
      chosen, gates = ref_v3_token(logits[g, t], bias, 8, 3, 4, 2, norm, 2.5)
      assert sorted(idx[g, t]) == chosen
      for k in range(3):
        np.testing.assert_allclose(w[g, t, k], gates[idx[g, t, k]], rtol=1e-5)
      changed += chosen != ref_v3_token(logits[g, t], 0 * bias, 8, 3, 4, 2, norm, 2.5)[0]
  assert changed > 0  # the bias steers selection in this example


def test_v3_bias_changes_selection_not_weights():
  cfg = v3_cfg(n_group=1, topk_group=1, top_k=1, norm_topk_prob=False, routed_scaling_factor=1.0)
  logits = jnp.array([[[2.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]]])
  bias = jnp.array([0.0, 1.0, 0, 0, 0, 0, 0, 0])
  r = route(logits, cfg, slots=False, bias=bias)
  assert int(r.expert_index[0, 0, 0]) == 1  # sigmoid(0) + 1 > sigmoid(2)
  np.testing.assert_allclose(float(r.weight[0, 0, 0]), 0.5, rtol=1e-6)  # sigmoid(0), no bias


def test_v3_sequence_wise_balance_loss():
  """L = alpha * sum_i f_i P_i per sequence, f_i = E/(K T) count_i, P_i = mean_t s'_{i,t}."""
  cfg = v3_cfg()
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((3, 10, 8))
  r = jax.jit(lambda x: route(x, cfg, slots=False))(jnp.asarray(logits, jnp.float32))
  s = 1 / (1 + np.exp(-logits))
  sp = s / s.sum(-1, keepdims=True)
  idx = np.asarray(r.expert_index)
  losses = []
  for g in range(3):
    count = np.bincount(idx[g].ravel(), minlength=8)
    f = 8 / (3 * 10) * count
    losses.append(0.1 * np.sum(f * sp[g].mean(0)))
  np.testing.assert_allclose(float(r.aux_losses["load_balance_loss"]), np.mean(losses), rtol=1e-5)


def test_v2_group_limited_greedy_matches_reference():
  cfg = make_moe_cfg("shared_experts", num_experts=8, top_k=2, n_group=4, topk_group=1)
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((1, 32, 8)) * 2
  r = jax.jit(lambda x: route(x, cfg, slots=False))(jnp.asarray(logits, jnp.float32))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for t in range(32):
    best = int(np.argmax(p[0, t].reshape(4, 2).max(-1)))
    ref = sorted(range(2 * best, 2 * best + 2), key=lambda i: -p[0, t, i])
    assert list(np.asarray(r.expert_index[0, t])) == ref
    np.testing.assert_allclose(np.asarray(r.weight[0, t]), p[0, t, ref], rtol=1e-5)


def test_bias_update_hand_example():
  """b_i += gamma * sign(mean c - c_i): overloaded experts lose gamma, underloaded gain it."""
  bias = jnp.array([0.0, 0.1, -0.2, 0.3])
  load = jnp.array([0.5, 0.25, 0.25, 0.0])  # mean 0.25
  np.testing.assert_allclose(
    np.asarray(update_router_bias(bias, load, 0.01)), [-0.01, 0.1, -0.2, 0.31], atol=1e-7
  )


def _balance(steps: int, rate: float, seed: int = 0):
  """A router skewed to expert 0 over fixed tokens; only the bias rule moves (no aux loss)."""
  cfg = v3_cfg(n_group=1, topk_group=1, top_k=2, bias_update_rate=rate)
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((4, 64, 8)) + np.linspace(2.0, -2.0, 8)
  logits = jnp.asarray(logits, jnp.float32)

  @jax.jit
  def step(bias, _):
    load = route(logits, cfg, slots=False, bias=bias).metrics["selected_load"]
    return update_router_bias(bias, load, cfg.bias_update_rate), load

  bias, loads = jax.lax.scan(step, jnp.zeros(8), None, length=steps)
  before, after = (
    np.asarray(loads[0]),
    np.asarray(route(logits, cfg, bias=bias).metrics["selected_load"]),
  )
  print(
    f"load max/min before {before.max():.3f}/{before.min():.3f}, "
    f"after {steps} steps {after.max():.3f}/{after.min():.3f}"
  )
  return before, after


@pytest.mark.parametrize(
  "steps, rate", [(60, 0.05), pytest.param(300, 0.01, marks=pytest.mark.slow)]
)
def test_bias_rule_balances_skewed_router(steps, rate):
  before, after = _balance(steps, rate)
  assert before.max() / max(before.min(), 1e-9) > 10
  assert after.max() - after.min() < 0.25 * (before.max() - before.min())
  assert after.max() < 1.5 / 8


def _tiny_v3_model(**moe):
  moe = dict(
    num_experts=4,
    expert_d_ff=16,
    router="deepseek_v3",
    top_k=2,
    num_shared_experts=1,
    norm_topk_prob=True,
    dropless=True,
    load_balance_weight=0.0,
    z_loss_weight=0.0,
    bias_update_rate=0.05,
    **moe,
  )
  return ModelConfig.from_config(
    dict(
      vocab_size=64,
      d_model=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=2,
      head_dim=8,
      d_ff=32,
      moe_every=1,
      first_moe_layer=0,
      max_len=16,
      moe=moe,
    )
  )


@pytest.mark.slow  # a full train-step compile; the rule itself is tested fast above
@pytest.mark.parametrize("scan", [False, True])
def test_train_step_applies_bias_rule_not_optimizer(scan):
  """With AdamW (weight decay on) the bias leaves take exactly the sign rule on the step's
  selection load; every other parameter moves by the optimizer."""
  cfg = dataclasses.replace(_tiny_v3_model(), scan_layers=scan)
  model = Transformer(cfg)
  params = init_model_params(cfg, shape=(1, 16))
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
  batch = dict(inputs=tokens, targets=tokens, mask=jnp.ones((4, 16)))
  step = jax.jit(make_train_step(model, tx, lambda s: 1e-2))
  new, metrics = step(state, batch)
  _, aux = model.apply({"params": params}, tokens)
  for i in range(2):
    load = aux["metrics"][f"layers_{i}"]["selected_load"]
    expected = update_router_bias(jnp.zeros(4), load, 0.05)
    got = (
      new.params["scanned_layers"]["block_0"]["ffn"]["router_bias"][i]
      if scan
      else new.params[f"layers_{i}"]["ffn"]["router_bias"]
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-7)
    assert np.any(np.asarray(got) != 0)


def test_config_errors_name_fields():
  with pytest.raises(ConfigError, match="n_group"):
    make_moe_cfg("topk", num_experts=8, n_group=2)
  with pytest.raises(ConfigError, match="topk_group"):
    make_moe_cfg("deepseek_v3", num_experts=8, n_group=2, topk_group=3)
  with pytest.raises(ConfigError, match="bias_update_rate"):
    make_moe_cfg("topk", bias_update_rate=0.1)
  with pytest.raises(ConfigError, match="top_k"):
    make_moe_cfg("deepseek_v3", num_experts=8, n_group=4, topk_group=1, top_k=3)


@pytest.mark.slow
def test_v3_dropless_sorted_and_expert_parallel_equal_the_capacity_path():
  """Dropless deepseek_v3 (random selection bias): sorted grouped-matmul path and the
  expert-parallel row exchange on a 2x2x2 mesh == the C = S slot path (values, grads)."""
  import flax.linen as nn

  from moejax.layers.moe import MoELayer
  from moejax.moe_config import MoEConfig
  from moejax.parallel import shard_params
  from tests import test_dropless as td
  from tests.helpers import random_like

  cfg = MoEConfig(
    router="deepseek_v3",
    num_experts=8,
    expert_d_ff=32,
    top_k=3,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    num_shared_experts=1,
    dropless=True,
    group_size=8,
    config_path="model.moe",
  )
  init = jax.jit(MoELayer(cfg).init)(jax.random.key(0), jnp.zeros(td.X_SHAPE))["params"]
  boxed = random_like(init, seed=3, router_scale=4.0)
  params = nn.meta.unbox(boxed)
  x, ct = td.inputs()
  want = td.loss_and_grads(MoELayer(dataclasses.replace(cfg, expert_impl="capacity")))(
    params, x, ct
  )
  sorted_cfg = dataclasses.replace(cfg, expert_impl="blocked")
  td.assert_close(td.loss_and_grads(MoELayer(sorted_cfg))(params, x, ct), want)
  mesh = td.mesh_of((2, 2, 2))
  sharded = nn.meta.unbox(shard_params(boxed, mesh))
  td.assert_close(td.loss_and_grads(MoELayer(sorted_cfg, mesh=mesh))(sharded, x, ct), want)


V3_MOE = dict(
  router="deepseek_v3",
  num_shared_experts=1,
  norm_topk_prob=True,
  dropless=True,
  load_balance_weight=0.0,
  bias_update_rate=0.01,
)


@pytest.mark.slow
def test_v3_training_resumes_exactly_with_its_router_bias(tmp_path, data_dir):
  """The Trainer checkpoints router_bias with the params: 4 + 4 resumed steps give the same
  losses and biases as 8 uninterrupted ones, and the bias has moved off zero."""
  from moejax.training.trainer import train
  from moejax.training.workdir import restore_state
  from tests.helpers import tiny_config

  cfg = tiny_config(data_dir, steps=8, checkpoint_every=4, **V3_MOE)
  one = jax.devices()[:1]
  full = train(cfg, str(tmp_path / "full"), show_progress=False, devices=one)
  train(cfg, str(tmp_path / "split"), show_progress=False, max_steps=4, devices=one)
  second = train(cfg, str(tmp_path / "split"), show_progress=False, devices=one)
  for s in range(5, 9):
    assert second.losses[s] == full.losses[s]
  split, whole = (
    np.asarray(
      restore_state(cfg, str(tmp_path / r), devices=one)[0].params["layers_1"]["ffn"]["router_bias"]
    )
    for r in ("split", "full")
  )
  np.testing.assert_array_equal(split, whole)
  assert np.any(whole != 0)
