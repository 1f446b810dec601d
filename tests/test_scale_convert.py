"""A scanned run (model.scan_layers) through the run boundary: its checkpoint holds the
stacked params, the tools see the unrolled layers_{i} form, HF export/import and
resharding round-trip bit-exactly."""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.convert import hf
from moejax.convert.reshard import reshard_checkpoint
from moejax.models import Transformer
from moejax.models.layer_stack import SCAN_KEY, stack_layers
from moejax.training.workdir import load_run_config, restore_state, write_run
from tests.helpers import tiny_config


@pytest.mark.slow
def test_scanned_run_round_trips_through_tools_and_hf(tmp_path, data_dir):
  cfg = tiny_config(
    data_dir, mesh=(2, 4, 1), router="topk", router_order="topk_softmax", dropless=True
  )
  with cfg.unlocked():
    cfg.model.num_layers = 3
    cfg.model.first_moe_layer = 0
    cfg.model.num_kv_heads = 1
    cfg.model.scan_layers = True
    cfg.train.fsdp = True
  unrolled_cfg = dataclasses.replace(ModelConfig.from_config(cfg.model), scan_layers=False)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.device_get(
    nn.meta.unbox(jax.jit(Transformer(unrolled_cfg).init)(jax.random.key(3), tokens)["params"])
  )
  run = str(tmp_path / "run")
  write_run(cfg, run, params)  # unrolled params in, stacked checkpoint out

  stacked, _, _, exp = restore_state(load_run_config(run), run, unrolled=False)
  assert SCAN_KEY in stacked.params and exp.model_cfg.scan_layers
  chex.assert_trees_all_equal(jax.device_get(stacked.params), stack_layers(params, exp.model_cfg))
  state, _, _, view = restore_state(load_run_config(run), run)
  assert not view.model_cfg.scan_layers and "layers_2" in state.params
  chex.assert_trees_all_equal(jax.device_get(state.params), params)
  opt_paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  ]
  assert any("layers_2" in p for p in opt_paths)
  assert not any(SCAN_KEY in p for p in opt_paths)

  # The scanned model on the stacked params == the unrolled model on the unrolled ones.
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
  scanned_logits = Transformer(exp.model_cfg).apply(
    {"params": jax.device_get(stacked.params)}, toks
  )[0]
  np.testing.assert_allclose(
    scanned_logits,
    Transformer(unrolled_cfg).apply({"params": params}, toks)[0],
    rtol=1e-5,
    atol=1e-5,
  )

  # HF export of the scanned run and import back: bit-exact.
  hf.export_hf(state.params, view.model_cfg, str(tmp_path / "hf"))
  _, imported = hf.import_hf(str(tmp_path / "hf"))
  chex.assert_trees_all_equal(imported, params)

  # Resharding keeps the stacked form and the values.
  out = str(tmp_path / "ep2")
  reshard_checkpoint(load_run_config(run), run, out, {"data": 4, "expert": 2, "model": 1})
  again, _, _, _ = restore_state(load_run_config(out), out)
  chex.assert_trees_all_equal(jax.device_get(again.params), params)
