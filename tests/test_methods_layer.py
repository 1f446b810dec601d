"""Compressed experts, multi-gate (MMoE / HoME) and pre-gating (Read-ME) routing in the
MoE layer: against per-token references written from the papers' formulas, and sharded
== unsharded."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.errors import ConfigError
from moejax.layers.moe import MoELayer
from moejax.models import Transformer
from moejax.models.transformer import pregate_choices
from moejax.routers.multigate import task_expert_mask
from moejax.routers.pregate import distinct_experts
from tests.helpers import init_model_params, make_moe_cfg, random_like
from tests.reference import gated_ffn_np, reference_routing, silu
from tests.test_expert_parallel import assert_close, mesh_of

D, F = 16, 8
X_SHAPE = (2, 16, D)  # 32 tokens, groups of 8

COMPRESSED = dict(num_experts=4, num_compressed_experts=2, top_k=2, group_size=8)
HOME = dict(
  router="multigate",
  num_experts=8,
  num_tasks=3,
  task_categories=(0, 0, 1),
  num_category_experts=1,
  num_task_experts=1,
  top_k=2,
  group_size=8,
)


def cfg_of(**kw):
  return make_moe_cfg(expert_d_ff=F, config_path="model.moe", **kw)


def inputs(seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32)
  ct = jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32)
  task = jnp.asarray(rng.integers(0, 3, X_SHAPE[:2]), jnp.int32)
  logits = jnp.asarray(rng.standard_normal((*X_SHAPE[:2], 6)) * 2, jnp.float32)
  return x, ct, task, logits


def layer_params(cfg, seed=3, **call):
  init = jax.jit(lambda x, call: MoELayer(cfg).init(jax.random.key(0), x, **call))
  boxed = init(jnp.zeros(X_SHAPE), call)["params"]
  return nn.meta.unbox(random_like(boxed, seed, router_scale=4.0))


def expert_sum(x_s, kept, si, params, e):
  """sum_{e kept for token si} w * FFN_e(x_s) (float64)."""
  out = np.zeros(x_s.shape[-1])
  for j in range(e):
    if (j, si) in kept:
      w = [np.asarray(params[n], np.float64)[j] for n in ("wi_gate", "wi_up", "wo")]
      out += kept[(j, si)] * gated_ffn_np(x_s, *w, "silu")
  return out


def reference_layer(x, logits, params, cfg, compressed=None):
  """Per token: y_s = sum_{kept real e} g FFN_e(x_s) + sum_{compressed picks j} g c_j."""
  s = cfg.group_size
  xg = np.asarray(x, np.float64).reshape(-1, s, x.shape[-1])
  lg = np.asarray(logits, np.float64).reshape(-1, s, logits.shape[-1])
  routing = reference_routing(
    lg, "topk", cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.dropless, cfg.router_order
  )
  y = np.zeros_like(xg)
  for g, (kept, _, choices) in enumerate(routing):
    for si in range(s):
      y[g, si] = expert_sum(xg[g, si], kept, si, params, cfg.num_experts)
      for idx, w in choices[si]:
        if compressed is not None and idx >= cfg.num_experts:
          y[g, si] += w * np.asarray(compressed, np.float64)[idx - cfg.num_experts]
  return y.reshape(x.shape)


@pytest.mark.parametrize(
  "dropless", [pytest.param(False, marks=pytest.mark.slow), True], ids=["capacity", "dropless"]
)
def test_compressed_experts_match_reference(dropless):
  cfg = cfg_of(**COMPRESSED, dropless=dropless, capacity_factor=1.0)
  params = layer_params(cfg)
  x = inputs()[0]
  y, aux = jax.jit(MoELayer(cfg).apply)({"params": params}, x)
  logits = np.einsum("bld,dr->blr", np.asarray(x, np.float64), params["router"])
  want = reference_layer(x, logits, params, cfg, params["compressed"])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  # the compressed picks happen and are not counted as drops
  picks = np.argsort(-logits, axis=-1)[..., :2]
  assert np.any(picks >= 4)
  if dropless:
    assert float(aux["metrics"]["dropped_fraction"]) == 0.0


def test_multigate_matches_reference_and_hierarchy():
  cfg = cfg_of(**HOME)
  # HoME layout: experts 0-2 shared, 3/4 categories 0/1, 5/6/7 tasks 0/1/2
  want_mask = np.zeros((3, 8), bool)
  want_mask[:, :3] = True
  want_mask[[0, 1], 3] = want_mask[2, 4] = True
  want_mask[0, 5] = want_mask[1, 6] = want_mask[2, 7] = True
  np.testing.assert_array_equal(task_expert_mask(cfg), want_mask)
  x, _, task, _ = inputs()
  params = layer_params(cfg, task_id=task)
  assert params["router"].shape == (3, D, 8)  # one gate per task
  apply = jax.jit(lambda p, x, t: MoELayer(cfg).apply({"params": p}, x, task_id=t))
  y, aux = apply(params, x, task)
  gates = np.asarray(params["router"], np.float64)
  logits = np.einsum("bld,blde->ble", np.asarray(x, np.float64), gates[np.asarray(task)])
  logits = np.where(want_mask[np.asarray(task)], logits, -np.inf)
  np.testing.assert_allclose(
    np.asarray(y), reference_layer(x, logits, params, cfg), rtol=1e-4, atol=1e-5
  )
  # a task never reaches another task's or category's experts
  for t in range(3):
    _, aux_t = apply(params, x, jnp.full_like(task, t))
    load = np.asarray(aux_t["metrics"]["expert_load"])
    assert np.all(load[~want_mask[t]] == 0) and load[want_mask[t]].sum() == pytest.approx(1.0)


def test_multigate_config_errors():
  with pytest.raises(ConfigError, match="model.moe.num_tasks"):
    cfg_of(router="multigate", num_experts=4)
  with pytest.raises(ConfigError, match="model.moe.top_k"):
    cfg_of(**dict(HOME, top_k=6))  # each task may pick 3 shared + 1 + 1 = 5
  with pytest.raises(ConfigError, match="model.moe.num_compressed_experts"):
    cfg_of(router="expert_choice", num_compressed_experts=1)


CASES = {  # name: (moe fields, call args from inputs(), mesh)
  "compressed_capacity": (dict(COMPRESSED, capacity_factor=1.0), {}, (1, 4, 2)),
  "compressed_dropless": (
    dict(COMPRESSED, dropless=True, router_order="topk_softmax"),
    {},
    (2, 2, 1),
  ),
  "multigate": (dict(HOME, capacity_factor=1.0), {"task_id": 2}, (2, 2, 1)),
  "pregate_dropless": (
    dict(
      router="pregate",
      num_experts=4,
      num_compressed_experts=2,
      top_k=2,
      group_size=8,
      dropless=True,
    ),
    {"router_logits": 3},
    (1, 4, 2),
  ),
}


@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=pytest.mark.slow) if n == "compressed_dropless" else n for n in CASES],
)
def test_sharded_equals_unsharded(name):
  moe, call_args, shape = CASES[name]
  cfg = cfg_of(**moe)
  data = inputs()
  call = {k: data[i] for k, i in call_args.items()}
  params = layer_params(cfg, **call)
  if "compressed" in params:
    params["compressed"] = jnp.asarray(np.random.default_rng(7).standard_normal((2, D)))

  def fn(layer):
    def loss(p, x, ct):
      y, aux = layer.apply({"params": p}, x, **call)
      return jnp.sum(y * ct) + sum(aux["aux_losses"].values()), (y, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  ref = fn(MoELayer(cfg))(params, data[0], data[1])
  got = fn(MoELayer(cfg, mesh=mesh_of(shape)))(params, data[0], data[1])
  assert_close(got, jax.tree.map(lambda a: np.asarray(a, np.float64), ref))


def tiny_model(**moe):
  return ModelConfig(
    vocab_size=32,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    d_ff=32,
    moe_every=1,
    first_moe_layer=1,
    max_len=16,
    moe=make_moe_cfg(expert_d_ff=F, **moe),
  )


def test_pregate_routes_every_layer_from_the_embeddings():
  """Read-ME: each MoE layer's logits are W2[:, m] silu(W1 RMSNorm(e_token)) -- a
  function of the token id alone, known before any block runs."""
  cfg = tiny_model(router="pregate", num_experts=4, top_k=2, pregate_d_hidden=8)
  params = init_model_params(cfg, shape=(1, 8))
  assert "router" not in params["layers_1"]["ffn"] and params["pregate"]["w2"].shape == (8, 1, 4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)

  @jax.jit
  def pregate_logits(tokens):
    _, state = Transformer(cfg).apply(
      {"params": params},
      tokens,
      capture_intermediates=lambda m, n: m.name == "pregate",
      mutable=["intermediates"],
    )
    return state["intermediates"]["pregate"]["__call__"][0]

  got = np.asarray(pregate_logits(tokens))
  emb = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(tokens)]
  pre = params["pregate"]
  normed = emb / np.sqrt(np.mean(emb**2, -1, keepdims=True) + 1e-6) * pre["norm"]["scale"]
  want = np.einsum("blh,hmr->blmr", silu(normed @ pre["w1"]), pre["w2"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  idx, valid = jax.jit(pregate_choices, static_argnums=0)(
    cfg, params, tokens
  )  # the lookahead: top-2 of those logits
  np.testing.assert_array_equal(idx, np.argsort(-got, axis=-1, kind="stable")[..., :2])
  assert idx.shape == (2, 8, 1, 2) and np.all(valid)
  # the same token gets the same experts whatever its context
  other = np.asarray(pregate_logits(tokens.at[:, 1:].set((tokens[:, 1:] + 5) % 32)))
  np.testing.assert_array_equal(other[:, 0], got[:, 0])


def test_distinct_experts_counts_unions():
  # T=2 steps, B=2 sequences, M=1 layer, K=2 choices over E=4 experts
  idx = np.array([[[[0, 1]], [[1, 2]]], [[[3, 3]], [[0, 3]]]], np.int32)
  valid = np.ones(idx.shape, bool)
  valid[1, 0, 0, 1] = False
  out = distinct_experts(jnp.asarray(idx), jnp.asarray(valid), 4)
  np.testing.assert_array_equal(out["per_step"], [[3], [2]])  # {0,1,2}, {3,0}
  np.testing.assert_array_equal(out["per_batch"], [4])
  np.testing.assert_allclose(out["per_token"], [(2 + 2 + 1 + 2) / 4])


@pytest.mark.slow
def test_multigate_transformer_uses_task_ids():
  cfg = tiny_model(**dict(HOME, group_size=None, num_experts=8))
  params = init_model_params(cfg, shape=(1, 8))
  tokens = jnp.zeros((2, 8), jnp.int32) + jnp.arange(8)
  apply = jax.jit(lambda p, ids, task: Transformer(cfg).apply({"params": p}, ids, task_id=task)[0])
  a = apply(params, tokens, jnp.zeros((2, 8), jnp.int32))
  b = apply(params, tokens, jnp.full((2, 8), 2, jnp.int32))
  mixed = apply(params, tokens, jnp.zeros((2, 8), jnp.int32).at[1].set(2))
  assert not np.allclose(a, b)
  np.testing.assert_allclose(mixed[0], a[0], rtol=1e-6)  # each row follows its own task
  np.testing.assert_allclose(mixed[1], b[1], rtol=1e-6)


def test_generation_lookahead_report_counts_the_generated_tokens_experts():
  """moejax.generate --report_experts: the experts of each generated token (from the
  pre-gate alone) united over the batch per decode step and over the whole batch; steps
  past a sequence's end count nothing."""
  from moejax.generate import expert_lookahead_report

  cfg = tiny_model(router="pregate", num_experts=4, top_k=2, pregate_d_hidden=8)
  params = init_model_params(cfg, shape=(1, 8))
  prompts, new = [[3, 4, 5], [7]], [[9, 1, 2], [11, 12]]
  report = expert_lookahead_report(cfg, params, prompts, new, pad_id=0)
  choices = jax.jit(pregate_choices, static_argnums=0)  # one compile for the 5 tokens
  sets = []  # sets[t][b]: experts of sequence b's generated token t (layer 0)
  for t in range(3):
    row = []
    for n in new:
      if t < len(n):
        idx, _ = choices(cfg, params, jnp.asarray([[n[t]]], jnp.int32))
        row.append(set(np.asarray(idx)[0, 0, 0].tolist()))
    sets.append(row)
  assert report["per_step"] == [[len(set().union(*row))] for row in sets]
  assert report["per_batch"] == [len(set().union(*[s for row in sets for s in row]))]
  np.testing.assert_allclose(report["per_token"], [2.0 * 5 / 6])  # 5 real of 6 (step, seq)
