"""Checkpoint conversion: reshard, HF safetensors export/import, upcycle, merge, CLI."""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moejax.compress import contiguous_groups, merge_experts, upcycle_params
from moejax.config import ModelConfig
from moejax.convert import hf, hf_mixtral
from moejax.convert.reshard import reshard_checkpoint
from moejax.convert.safetensors_io import INDEX_FILE, ConversionError
from moejax.models import Transformer
from moejax.training.state import abstract_params
from moejax.training.trainer import train
from moejax.training.workdir import load_run_config, restore_state, write_run
from tests.helpers import REPO, assert_same_safetensors, init_model_params, tiny_config

MIXTRAL_MOE = dict(router="topk", router_order="topk_softmax", dropless=True, top_k=2)


def mixtral_model_cfg(**overrides) -> ModelConfig:
  cfg = tiny_config("/unused", **MIXTRAL_MOE)
  with cfg.unlocked():
    cfg.model.first_moe_layer = 0
    cfg.model.num_kv_heads = 1
    for k, v in overrides.items():
      cfg.model[k] = v
  return ModelConfig.from_config(cfg.model)


def init_params(model_cfg: ModelConfig, seed: int = 0):
  return jax.device_get(init_model_params(model_cfg, seed))


def logits_of(model_cfg: ModelConfig, params, tokens) -> np.ndarray:
  return np.asarray(Transformer(model_cfg).apply({"params": params}, tokens)[0])


def random_tokens(model_cfg, shape=(2, 16), seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, model_cfg.vocab_size, shape), jnp.int32
  )


def test_export_import_is_bit_exact(tmp_path):
  model_cfg = mixtral_model_cfg()
  params = init_params(model_cfg)
  files = hf.export_hf(params, model_cfg, str(tmp_path / "hf"))
  assert "config.json" in files and "model.safetensors" in files
  section, imported = hf.import_hf(str(tmp_path / "hf"))
  # d_ff (the dense width) is unused when every layer is MoE; everything else round-trips.
  assert dataclasses.replace(ModelConfig.from_config(section), d_ff=model_cfg.d_ff) == model_cfg
  chex.assert_trees_all_equal(imported, params)  # bit-exact, same structure and dtypes
  # and again: the re-exported tensors are identical to the first export
  hf.export_hf(imported, model_cfg, str(tmp_path / "hf2"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "hf2")


def test_sharded_export_writes_an_index_and_round_trips(tmp_path):
  model_cfg = mixtral_model_cfg()
  params = init_params(model_cfg, seed=1)
  files = hf.export_hf(params, model_cfg, str(tmp_path / "hf"), max_shard_bytes=20_000)
  assert INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  _, imported = hf.import_hf(str(tmp_path / "hf"))
  chex.assert_trees_all_equal(imported, params)


def test_export_names_follow_the_mixtral_layout(tmp_path):
  model_cfg = mixtral_model_cfg()
  params = init_params(model_cfg)
  tensors = hf_mixtral.to_hf_tensors(params, model_cfg)
  e, d, f = model_cfg.moe.num_experts, model_cfg.d_model, model_cfg.moe.expert_d_ff
  for i in range(model_cfg.num_layers):
    for j in range(e):
      prefix = f"model.layers.{i}.block_sparse_moe.experts.{j}"
      assert tensors[f"{prefix}.w1.weight"].shape == (f, d)
      assert tensors[f"{prefix}.w3.weight"].shape == (f, d)
      assert tensors[f"{prefix}.w2.weight"].shape == (d, f)
      np.testing.assert_array_equal(
        tensors[f"{prefix}.w1.weight"], params[f"layers_{i}"]["ffn"]["wi_gate"][j].T
      )
    assert tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"].shape == (e, d)
  assert tensors["lm_head.weight"].shape == (model_cfg.vocab_size, d)


def test_export_rejects_a_model_mixtral_cannot_express(tmp_path):
  cfg = tiny_config("/unused", router="topk", router_order="softmax_topk")
  model_cfg = ModelConfig.from_config(cfg.model)
  with pytest.raises(ConversionError, match="router_order"):
    hf.export_hf(init_params(model_cfg), model_cfg, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_import_errors_name_the_tensor_and_leave_nothing_behind(tmp_path):
  from safetensors.numpy import load_file, save_file

  model_cfg = mixtral_model_cfg()
  src = tmp_path / "hf"
  hf.export_hf(init_params(model_cfg), model_cfg, str(src))
  tensors = load_file(str(src / "model.safetensors"))
  missing = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
  save_file({k: v for k, v in tensors.items() if k != missing}, str(src / "model.safetensors"))
  with pytest.raises(ConversionError, match=missing.replace(".", r"\.")):
    hf.import_hf(str(src))
  bad = dict(tensors)
  bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 5), np.float32)
  save_file(bad, str(src / "model.safetensors"))
  with pytest.raises(
    ConversionError,
    match=r"q_proj\.weight has shape \(3, 5\) but .* "
    r"expects \(32, 32\)",
  ):
    hf.import_hf(str(src))
  (src / "config.json").write_text('{"model_type": "gpt_oss_unknown"}')
  with pytest.raises(ConversionError, match="unknown architecture"):
    hf.import_hf(str(src))
  with pytest.raises(FileExistsError):  # never overwrites silently
    hf.export_hf(init_params(model_cfg), model_cfg, str(src))


@pytest.mark.slow
def test_upcycled_model_equals_the_dense_model_at_step_zero():
  dense_cfg = tiny_config("/unused")
  with dense_cfg.unlocked():
    dense_cfg.model.moe_every = 0
  dense_model_cfg = ModelConfig.from_config(dense_cfg.model)
  moe_cfg = tiny_config("/unused", **MIXTRAL_MOE)
  with moe_cfg.unlocked():
    moe_cfg.model.first_moe_layer = 0
    moe_cfg.model.moe.expert_d_ff = dense_cfg.model.d_ff
  moe_model_cfg = ModelConfig.from_config(moe_cfg.model)
  dense_params = init_params(dense_model_cfg, seed=3)
  moe_params = upcycle_params(
    dense_params, moe_model_cfg, abstract_params(moe_model_cfg), jax.random.key(1)
  )
  tokens = random_tokens(dense_model_cfg)
  np.testing.assert_allclose(
    logits_of(moe_model_cfg, moe_params, tokens),
    logits_of(dense_model_cfg, dense_params, tokens),
    rtol=1e-5,
    atol=1e-5,
  )
  router = moe_params["layers_0"]["ffn"]["router"]
  assert np.std(router) > 0  # a fresh router, not a copy of anything


def test_merging_groups_of_identical_experts_keeps_the_output():
  # 8 experts built as 4 identical pairs; top-2 then always picks both members of the best
  # pair (their logits tie), which after merging is top-1 of 4 with weight 1.
  model_cfg = mixtral_model_cfg()
  params = init_params(model_cfg, seed=4)
  flat = traverse_util.flatten_dict(params, sep="/")
  for path in list(flat):
    if path.endswith(("ffn/wi_gate", "ffn/wi_up", "ffn/wo")):
      flat[path] = np.repeat(flat[path][::2], 2, axis=0)
    if path.endswith("ffn/router"):
      flat[path] = np.repeat(flat[path][:, ::2], 2, axis=1)
  paired = traverse_util.unflatten_dict(flat, sep="/")
  groups = contiguous_groups(4, 2)
  layers = {i: groups for i in range(model_cfg.num_layers)}
  merged = merge_experts(
    paired, model_cfg, layers, {i: np.array([0.1, 0.3, 0.2, 0.4]) for i in layers}
  )
  merged_cfg = mixtral_model_cfg()
  merged_cfg = dataclasses.replace(
    merged_cfg, moe=dataclasses.replace(merged_cfg.moe, num_experts=2, top_k=1)
  )
  tokens = random_tokens(model_cfg, seed=5)
  np.testing.assert_allclose(
    logits_of(merged_cfg, merged, tokens),
    logits_of(model_cfg, paired, tokens),
    rtol=1e-5,
    atol=1e-5,
  )
  assert merged["layers_0"]["ffn"]["wi_gate"].shape[0] == 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, mesh=(2, 4, 1), **MIXTRAL_MOE)
  with cfg.unlocked():
    cfg.model.first_moe_layer = 0
    cfg.train.eval_every = 0  # one compile less
  train(cfg, workdir, show_progress=False)
  return workdir


def test_resharded_checkpoint_gives_the_same_model(trained_run, tmp_path):
  config = load_run_config(trained_run)
  out = str(tmp_path / "ep2")
  step = reshard_checkpoint(config, trained_run, out, {"data": 4, "expert": 2, "model": 1})
  assert step == 2
  before, _, _, exp_before = restore_state(config, trained_run)
  after, _, _, exp_after = restore_state(load_run_config(out), out)
  assert dict(exp_after.mesh.shape) == {"data": 4, "expert": 2, "model": 1}
  spec = after.params["layers_0"]["ffn"]["wi_gate"].sharding.spec
  assert spec[0] == "expert"
  chex.assert_trees_all_equal(jax.device_get(before), jax.device_get(after))
  tokens = random_tokens(exp_before.model_cfg, shape=(8, 16))
  out_before = jax.jit(exp_before.model.apply)({"params": before.params}, tokens)[0]
  out_after = jax.jit(exp_after.model.apply)({"params": after.params}, tokens)[0]
  np.testing.assert_allclose(np.asarray(out_after), np.asarray(out_before), rtol=1e-5, atol=1e-5)


def test_cli_help_and_export(trained_run, tmp_path):
  tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
  env = dict(
    os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO
  )  # this checkout's moejax, whatever is installed
  out = subprocess.run(
    [sys.executable, tool, "--help"], capture_output=True, text=True, env=env, timeout=120
  )
  assert out.returncode == 0
  for sub in ("reshard", "export-hf", "import-hf", "upcycle"):
    assert sub in out.stdout
  # relative paths, as users type them (Orbax itself insists on absolute ones)
  out = subprocess.run(
    [
      sys.executable,
      tool,
      "export-hf",
      "--workdir",
      os.path.relpath(trained_run, tmp_path),
      "--out",
      "hf",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  state, _, _, exp = restore_state(load_run_config(trained_run), trained_run)
  _, imported = hf.import_hf(str(tmp_path / "hf"))
  chex.assert_trees_all_equal(imported, jax.device_get(state.params))


@pytest.mark.slow
def test_trainer_continues_a_tool_written_run_from_its_own_config(tmp_path, data_dir):
  # written on the 8 test devices, continued on 1 (mesh data=-1 adapts)
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, mesh=(-1, 1, 1), **MIXTRAL_MOE)
  with cfg.unlocked():
    cfg.model.first_moe_layer = 0
  params = init_params(ModelConfig.from_config(cfg.model), seed=6)
  write_run(cfg, str(tmp_path / "run"), params)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, "-m", "moejax.train", "--workdir", "run", "--noprogress"],
    cwd=tmp_path,
    env=dict(env, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from checkpoint step 0" in out.stderr
  assert "finished at step 2" in out.stdout


def test_upcycle_run_cli_writes_a_run_equal_to_the_dense_model(tmp_path, data_dir):
  from tools.convert_checkpoint import main

  dense_cfg = tiny_config(data_dir, mesh=(-1, 1, 1))
  with dense_cfg.unlocked():
    dense_cfg.model.moe_every = 0
  dense_model_cfg = ModelConfig.from_config(dense_cfg.model)
  dense_params = init_params(dense_model_cfg, seed=3)
  write_run(dense_cfg, str(tmp_path / "dense"), dense_params)
  out = str(tmp_path / "moe")
  assert (
    main(
      [
        "upcycle",
        "--eval_batches",
        "0",
        "--workdir",
        str(tmp_path / "dense"),
        "--out",
        out,
        "--num_experts",
        "4",
        "--top_k",
        "2",
        "--seed",
        "1",
      ]
    )
    == 0
  )
  state, _, step, exp = restore_state(load_run_config(out), out)
  assert step == 0 and exp.model_cfg.moe_layers == (0, 1)
  assert exp.model_cfg.moe.num_experts == 4 and exp.model_cfg.moe.expert_d_ff == 64
  tokens = random_tokens(dense_model_cfg)
  np.testing.assert_allclose(
    logits_of(exp.model_cfg, jax.device_get(state.params), tokens),
    logits_of(dense_model_cfg, dense_params, tokens),
    rtol=1e-5,
    atol=1e-5,
  )
  # an MoE run is refused with an error naming the field, before anything is written
  assert (
    main(["upcycle", "--workdir", out, "--out", str(tmp_path / "again"), "--num_experts", "4"]) == 2
  )
  assert not os.path.exists(tmp_path / "again")
