"""FSDP and gradient accumulation: FSDP (+ scanned layers) training on 8 devices equals
1-device training for every router; microbatches give the one-big-batch update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models.layer_stack import stack_layers, unrolled_config, unstack_layers
from moejax.training.experiment import build_experiment
from moejax.training.state import TrainState, create_train_state
from moejax.training.step import make_train_step, split_microbatches
from tests.helpers import tiny_config

ROUTER_KW = {
  "topk": dict(),
  "expert_choice": dict(capacity_factor=2.0),
  "null_experts": dict(num_null_experts=4),
  "shared_experts": dict(num_shared_experts=2),
  "top_p": dict(top_k=3, top_p=0.6),
}


def _config(
  mesh, router="topk", fsdp=False, scan=False, microbatches=1, batch=8, num_layers=3, **kw
):
  cfg = tiny_config("unused", mesh=mesh, router=router, **ROUTER_KW[router])
  with cfg.unlocked():
    cfg.model.num_layers = num_layers
    cfg.model.scan_layers = scan
    cfg.train.fsdp = fsdp
    cfg.train.microbatches = microbatches
    cfg.data.global_batch_size = batch
    for k, v in kw.items():
      section, field = k.split("__")
      cfg[section][field] = v
  return cfg


def _batches(cfg, n):
  rng = np.random.default_rng(0)
  b, l = cfg.data.global_batch_size, cfg.data.seq_len
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 259, (b, l + 1)).astype(np.int32)
    mask = (rng.random((b, l)) < 0.9).astype(np.float32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask})
  return out


_INITIAL_PARAMS = {}  # (unrolled model, seed, seq_len) -> params: built once per worker


def _initial_params(ref_cfg):
  key = (repr(ref_cfg.model), ref_cfg.train.seed, ref_cfg.data.seq_len)
  if key not in _INITIAL_PARAMS:
    ref = build_experiment(ref_cfg, devices=jax.devices()[:1])
    init = create_train_state(
      ref.model, ref.tx, ref_cfg.data.seq_len, ref_cfg.train.seed, ref.state_shardings
    )
    _INITIAL_PARAMS[key] = jax.device_get(init.params)
  return _INITIAL_PARAMS[key]


def _run(cfg, batches, devices=None):
  """(losses, final params (unrolled), experiment) after len(batches) steps."""
  exp = build_experiment(cfg, devices=devices)
  # The same initial params for every run: the unrolled model's, stacked when scanned.
  one_device = {"mesh.data": 1, "mesh.expert": 1, "mesh.model": 1}
  ref_cfg = unrolled_config(exp.config).replace_fields(one_device)
  params = jax.device_put(
    stack_layers(_initial_params(ref_cfg), exp.model_cfg), exp.state_shardings.params
  )
  opt_state = jax.jit(exp.tx.init, out_shardings=exp.state_shardings.opt_state)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  step = jax.jit(
    make_train_step(exp.model, exp.tx, exp.schedule, microbatches=cfg.train.microbatches),
    in_shardings=(exp.state_shardings, exp.batch_sharding),
    out_shardings=(exp.state_shardings, None),
  )
  losses = []
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, exp.batch_sharding))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(unstack_layers(state.params, exp.model_cfg)), exp


# topk runs by default; the other routers (~2 min each on 2 cores) with -m slow.
@pytest.mark.parametrize(
  "router", [r if r == "topk" else pytest.param(r, marks=pytest.mark.slow) for r in ROUTER_KW]
)
def test_fsdp_scanned_sharded_training_equals_single_device(router):
  batches = _batches(_config((1, 1, 1)), 3)
  single, p1, _ = _run(_config((1, 1, 1), router), batches, jax.devices()[:1])
  sharded, p8, exp = _run(_config((2, 4, 1), router, fsdp=True, scan=True), batches)
  # Parameters really are split over the data axis (FSDP), experts over 'expert' too.
  specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, exp.state_shardings.params))
  assert any("data" in jax.tree.leaves(tuple(s)) for s in specs)
  wi = exp.state_shardings.params["scanned_layers"]["block_0"]["ffn"]["wi_gate"].spec
  assert tuple(wi) == (None, "expert", "data", "model")  # [layers, E, d, f]
  np.testing.assert_allclose(sharded, single, rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(p8, p1, rtol=2e-3, atol=2e-4)


def test_fsdp_divides_parameter_memory():
  from moejax.planning import sharded_bytes

  plain = build_experiment(_config((8, 1, 1)))
  fsdp = build_experiment(_config((8, 1, 1), fsdp=True))
  full = sharded_bytes(plain.abstract_state.params)
  # d_model = 32 splits 8 ways and every parameter has a d_model axis.
  assert sharded_bytes(fsdp.abstract_state.params) * 8 == full


def test_microbatches_split_rows_locally():
  x = jnp.arange(12).reshape(6, 2)
  mb = split_microbatches({"x": x}, 3)["x"]
  np.testing.assert_array_equal(mb[1], x[1::3])


@pytest.mark.parametrize(
  "case",
  [
    pytest.param("dense", marks=pytest.mark.slow),
    "moe_no_aux",
    pytest.param("sharded_fsdp", marks=pytest.mark.slow),
  ],
)
def test_microbatches_equal_one_big_batch(case):
  kw = dict(batch=16, num_layers=2)  # a dense and an MoE block
  if case == "dense":
    kw.update(model__moe_every=0)
  mesh, devices = ((2, 4, 1), None) if case == "sharded_fsdp" else ((1, 1, 1), jax.devices()[:1])
  big_cfg = _config(mesh, fsdp=case == "sharded_fsdp", **kw)
  with big_cfg.unlocked():  # aux losses are per-batch statistics: not additive
    big_cfg.model.moe.load_balance_weight = 0.0
    big_cfg.model.moe.z_loss_weight = 0.0
  micro_cfg = big_cfg.copy_and_resolve_references()
  with micro_cfg.unlocked():
    micro_cfg.train.microbatches = 2 if case == "sharded_fsdp" else 4
  batches = _batches(big_cfg, 2)
  big, p_big, _ = _run(big_cfg, batches, devices)
  micro, p_micro, _ = _run(micro_cfg, batches, devices)
  np.testing.assert_allclose(micro, big, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(p_micro, p_big, rtol=1e-4, atol=1e-6)


def test_microbatches_must_divide_the_batch():
  from moejax.errors import ConfigError

  with pytest.raises(ConfigError, match="train.microbatches"):
    build_experiment(_config((1, 1, 1), microbatches=3), devices=jax.devices()[:1])


def test_configs_without_new_fields_still_load():
  cfg = _config((1, 1, 1))
  with cfg.unlocked():
    del cfg.train["fsdp"]
    del cfg.train["microbatches"]
    del cfg.model["scan_layers"]
    del cfg.model["remat_policy"]
    del cfg.model["attention_impl"]
  exp = build_experiment(cfg, devices=jax.devices()[:1])
  assert not exp.model_cfg.scan_layers and exp.model_cfg.remat_mode == "none"
