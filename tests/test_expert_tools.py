"""Expert analysis and compression tools: stats, super experts, pruning, MC-SMoE merging."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from moejax.analysis import (
  build_report,
  collect_sums,
  layer_report,
  layer_sums,
  moe_layer_inputs,
  split_batches,
)
from moejax.analysis.workflows import load_params, run_config
from moejax.compress import dominant_experts, mc_smoe_groups, prune_model, router_logit_similarity
from moejax.compress.workflows import merge_run, prune_run
from moejax.config import ExperimentConfig, ModelConfig
from moejax.convert import hf
from moejax.errors import ConfigError
from moejax.layers import moe_forward
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.training.state import count_params
from moejax.training.trainer import train
from moejax.training.workdir import load_run_config, restore_state, save_run_config, write_run
from tests.helpers import REPO, tiny_config

TOOL = os.path.join(REPO, "tools", "expert_tools.py")
# Mixtral-style routing (exportable to HF): top-2 over renormalised logits, no drops.
MIXTRAL_MOE = dict(router="topk", router_order="topk_softmax", dropless=True, top_k=2)
NUM_BATCHES = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> str:
  """One tiny trained run: 2 layers, both MoE with 4 experts, top-2, 2 steps."""
  workdir = str(tmp_path_factory.mktemp("expert_run"))
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, mesh=(-1, 1, 1), **MIXTRAL_MOE)
  with cfg.unlocked():
    cfg.model.first_moe_layer = 0
    cfg.train.eval_every = 0  # one compile less
  # Trained on one device (a cheaper compile); the tools load it on all 8 (mesh data=-1).
  train(cfg, workdir, show_progress=False, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope="module")
def source(run):
  config, model_cfg = run_config(run)
  params, step = load_params(config, run)
  assert step == 2 and model_cfg.moe_layers == (0, 1)
  batches = list(split_batches(config, "validation", NUM_BATCHES))
  return config, model_cfg, params, batches


@pytest.fixture(scope="module")
def sums(source):
  _, model_cfg, params, batches = source
  return collect_sums(model_cfg, params, batches, progress=False)


def logits_of(model_cfg, params, tokens) -> np.ndarray:
  return np.asarray(jax.jit(Transformer(model_cfg).apply)({"params": params}, tokens)[0])


def layer_inputs(model_cfg, params, tokens):
  model = Transformer(model_cfg)
  return jax.jit(lambda p, t: moe_layer_inputs(model, p, t))(params, tokens)


def replace_moe(model_cfg, **changes):
  return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, **changes))


def per_token_reference(model_cfg, params, batch):
  """Numpy float64 per-token EASY-EP / PreMoe / max-activation sums of every MoE layer for
  dropless top-k with renormalised weights, counting tokens with mask 1 only."""
  _, inputs = layer_inputs(model_cfg, params, jnp.asarray(batch["inputs"]))
  mask = np.asarray(batch["mask"]).reshape(-1) > 0
  k = model_cfg.moe.top_k
  out = {}
  for i, x in inputs.items():
    ffn = {n: np.asarray(v, np.float64) for n, v in params[f"layers_{i}"]["ffn"].items()}
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])[mask]  # [T, d]
    logits = x @ ffn["router"]  # [T, E]
    e = logits.shape[1]
    top = np.argsort(-logits, axis=1)[:, :k]
    top_logits = np.take_along_axis(logits, top, axis=1)
    gate = np.exp(top_logits - top_logits.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    gate_norm, max_abs, coact = np.zeros(e), np.zeros(e), np.zeros((e, e))
    for t in range(x.shape[0]):
      for j in range(k):
        ex = top[t, j]
        h = x[t] @ ffn["wi_gate"][ex]
        y = (h / (1 + np.exp(-h)) * (x[t] @ ffn["wi_up"][ex])) @ ffn["wo"][ex]
        gate_norm[ex] += gate[t, j] * np.linalg.norm(y)
        max_abs[ex] = max(max_abs[ex], np.abs(y).max())
      coact[np.ix_(top[t], top[t])] += 1
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out[i] = {
      "tokens": x.shape[0],
      "gate_norm": gate_norm,
      "max_abs": max_abs,
      "prob": probs.sum(0),
      "coactivation": coact,
    }
  return out


# ----------------------------------------------------------------------------- stats


def test_sums_match_a_per_token_reference_with_padding_masked(source):
  _, model_cfg, params, batches = source
  batch = dict(batches[0])
  mask = np.ones_like(batch["mask"])
  mask[:, 20:] = 0  # pretend the tail of every row is padding
  mask[3] = 0
  batch["mask"] = mask
  got = collect_sums(model_cfg, params, [batch], progress=False)
  want = per_token_reference(model_cfg, params, batch)
  for i in model_cfg.moe_layers:
    assert got[i]["tokens"] == want[i]["tokens"] == mask.sum()
    np.testing.assert_allclose(got[i]["gate_norm"], want[i]["gate_norm"], rtol=1e-4)
    np.testing.assert_allclose(got[i]["max_abs"], want[i]["max_abs"], rtol=1e-4)
    np.testing.assert_allclose(got[i]["prob"], want[i]["prob"], rtol=1e-4)
    np.testing.assert_array_equal(got[i]["coactivation"], want[i]["coactivation"])


@pytest.mark.parametrize(
  "router, extra",
  [
    ("topk", dict(capacity_factor=0.75)),
    pytest.param("top_p", dict(top_p=0.6, capacity_factor=1.0), marks=pytest.mark.slow),
    ("expert_choice", dict(capacity_factor=1.5)),
    pytest.param(
      "null_experts", dict(num_null_experts=2, capacity_factor=1.0), marks=pytest.mark.slow
    ),
    pytest.param(
      "shared_experts", dict(num_shared_experts=1, capacity_factor=1.0), marks=pytest.mark.slow
    ),
    ("deepseek_v3", dict(dropless=True)),
  ],
)
def test_layer_sums_of_every_router_match_its_metrics(router, extra):
  """One routing group, so the layer's group-mean metrics are plain token means."""
  cfg = MoEConfig(num_experts=4, expert_d_ff=8, router=router, top_k=2, **extra)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 24, 16)), jnp.float32)
  ffn = {
    "router": rng.normal(size=(16, cfg.num_router_logits)).astype(np.float32),
    "wi_gate": rng.normal(size=(4, 16, 8)).astype(np.float32) / 4,
    "wi_up": rng.normal(size=(4, 16, 8)).astype(np.float32) / 4,
    "wo": rng.normal(size=(4, 8, 16)).astype(np.float32) / 3,
  }
  bias = None
  if router == "deepseek_v3":  # a selection bias that changes the choices: the stats follow it
    bias = ffn["router_bias"] = np.asarray([3.0, 0.0, 0.0, -3.0], np.float32)
  sums = jax.device_get(jax.jit(layer_sums, static_argnums=3)(x, jnp.ones((1, 24)), ffn, cfg))
  _, _, metrics = moe_forward(
    x, ffn["router"], ffn["wi_gate"], ffn["wi_up"], ffn["wo"], cfg, router_bias=bias
  )
  layer = layer_report(
    {k: np.asarray(v, np.float64) for k, v in sums.items()}, ModelConfig(moe_every=1, moe=cfg)
  )
  np.testing.assert_allclose(layer["load_fraction"], metrics["expert_load"], atol=1e-6)
  np.testing.assert_allclose(layer["dropped_rate"], metrics["dropped_fraction"], atol=1e-6)
  np.testing.assert_allclose(layer["router_entropy"], metrics["router_entropy"], rtol=1e-5)
  assert 0 <= layer["router_entropy"] <= math.log(cfg.num_router_logits)
  co = np.array(layer["coactivation"])
  np.testing.assert_array_equal(co, co.T)
  np.testing.assert_array_equal(np.diag(co), layer["tokens_per_expert"])
  assert len(layer["mean_router_prob"]) == cfg.num_router_logits
  assert math.isclose(sum(layer["mean_router_prob"]), 1.0, rel_tol=1e-5)
  if router == "expert_choice":  # every expert fills its C = ceil(1.5 * 24 / 4) slots
    assert layer["tokens_per_expert"] == [9.0] * 4 and layer["dropped_rate"] == 0


def test_capture_works_under_remat(source):
  _, model_cfg, params, batches = source
  tokens = jnp.asarray(batches[0]["inputs"][:2])
  plain = layer_inputs(model_cfg, params, tokens)[1]
  remat = layer_inputs(dataclasses.replace(model_cfg, remat=True), params, tokens)[1]
  chex.assert_trees_all_close(plain, remat, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_report_is_consistent_and_matches_the_layer_metrics(source, capacity_factor):
  """Dropless (None) and capacity-limited top-2: counts add up, co-activation is symmetric
  with the per-expert counts on its diagonal, and per-batch load / drop rate / entropy equal
  what the MoE layer itself reports in its metrics."""
  _, model_cfg, params, batches = source
  if capacity_factor is not None:
    model_cfg = replace_moe(model_cfg, dropless=False, capacity_factor=capacity_factor)
  k, e = model_cfg.moe.top_k, model_cfg.moe.num_experts
  apply = jax.jit(Transformer(model_cfg).apply)
  for batch in batches:
    assert batch["mask"].all()  # full batches: group means == token means below
    report = build_report(collect_sums(model_cfg, params, [batch], progress=False), model_cfg)
    metrics = apply({"params": params}, jnp.asarray(batch["inputs"]))[1]["metrics"]
    for i in model_cfg.moe_layers:
      layer = report["layers"][str(i)]
      t = layer["tokens"]
      assert t == batch["mask"].size
      counts = np.array(layer["tokens_per_expert"])
      assert counts.sum() == k * t - layer["assignments_dropped"]
      assert math.isclose(sum(layer["load_fraction"]), 1.0, rel_tol=1e-9)
      co = np.array(layer["coactivation"])
      chex.assert_shape(co, (e, e))
      np.testing.assert_array_equal(co, co.T)
      np.testing.assert_array_equal(np.diag(co), counts)
      assert 0.0 <= layer["router_entropy"] <= math.log(e) + 1e-9
      m = metrics[f"layers_{i}"]
      np.testing.assert_allclose(layer["dropped_rate"], m["dropped_fraction"], atol=1e-6)
      np.testing.assert_allclose(layer["router_entropy"], m["router_entropy"], rtol=1e-5)
      if capacity_factor is None:
        assert layer["assignments_dropped"] == 0
        np.testing.assert_allclose(layer["load_fraction"], m["expert_load"], rtol=1e-6)
      else:
        assert layer["assignments_dropped"] > 0  # C = ceil(0.5 * 32 * 2 / 4) = 8 < demand


def test_planted_outlier_is_the_only_super_expert(source, sums):
  _, model_cfg, params, batches = source
  clean = build_report(sums, model_cfg)
  assert all(not layer["super_experts"] for layer in clean["layers"].values())
  busiest = int(np.argmax(sums[0]["processed"]))
  planted = jax.tree.map(np.array, params)  # a deep copy
  planted["layers_0"]["ffn"]["wo"][busiest] *= 1000.0
  report = build_report(collect_sums(model_cfg, planted, batches, progress=False), model_cfg)
  assert report["layers"]["0"]["super_experts"] == [busiest]
  assert report["layers"]["1"]["super_experts"] == []
  ratio = report["layers"]["0"]["max_abs_ratio_to_median"]
  assert ratio[busiest] > 100 and max(np.delete(ratio, busiest)) < 10


def is_png(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stats_cli_writes_report_and_plots(run, source, sums, tmp_path):
  from tools.expert_tools import main

  _, model_cfg, _, _ = source
  out = str(tmp_path / "report")
  assert (
    main(["stats", "--workdir", run, "--out", out, "--batches", str(NUM_BATCHES), "--quiet"]) == 0
  )
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["step"] == 2 and report["split"] == "validation"
  expected = build_report(sums, model_cfg)
  for i in ("0", "1"):
    np.testing.assert_allclose(
      report["layers"][i]["tokens_per_expert"], expected["layers"][i]["tokens_per_expert"]
    )
  names = [
    "load_heatmap.png",
    "max_activation.png",
    "coactivation_layer_0.png",
    "coactivation_layer_1.png",
  ]
  for name in names:
    path = os.path.join(out, name)
    assert is_png(path), name
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50 and np.ptp(image) > 0


# ----------------------------------------------------------------------------- prune


@pytest.mark.slow
def test_pruning_nothing_gives_the_identical_model(run, source, tmp_path):
  _, model_cfg, params, batches = source
  out = str(tmp_path / "keep_all")
  summary = prune_run(
    run, out, keep=model_cfg.moe.num_experts, method="premoe", num_batches=1, progress=False
  )
  assert summary["kept_experts"] == {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}
  state, _, step, exp = restore_state(load_run_config(out), out)
  assert step == 0 and exp.model_cfg == model_cfg
  pruned = jax.device_get(state.params)
  chex.assert_trees_all_equal(pruned, params)
  tokens = jnp.asarray(batches[0]["inputs"])
  np.testing.assert_array_equal(
    logits_of(exp.model_cfg, pruned, tokens), logits_of(model_cfg, params, tokens)
  )


def test_pruning_keeps_top_experts_restores_trains_and_exports(run, source, sums, tmp_path):
  _, model_cfg, params, _ = source
  out = str(tmp_path / "pruned")
  summary = prune_run(
    run, out, keep=3, method="easy_ep", split="validation", num_batches=NUM_BATCHES, progress=False
  )
  config = load_run_config(out)
  state, _, _, exp = restore_state(config, out)
  assert exp.model_cfg.moe.num_experts == 3 and exp.model_cfg.moe.top_k == 2
  pruned = jax.device_get(state.params)
  removed = 0
  for i in model_cfg.moe_layers:
    kept = summary["kept_experts"][str(i)]
    # EASY-EP on the same batches: the dropped expert has the lowest gate x norm score
    dropped = int(np.argmin(sums[i]["gate_norm"]))
    assert kept == [e for e in range(4) if e != dropped]
    before, after = params[f"layers_{i}"]["ffn"], pruned[f"layers_{i}"]["ffn"]
    for name in ("wi_gate", "wi_up", "wo"):
      np.testing.assert_array_equal(after[name], before[name][kept])
      removed += before[name][0].size
    np.testing.assert_array_equal(after["router"], before["router"][:, kept])
    removed += before["router"].shape[0]
  assert count_params(pruned) == count_params(params) - removed

  config = config.replace_fields({"train.eval_every": 0})  # (saves a compile)
  result = train(config, out, show_progress=False)  # resumes the step-0 checkpoint
  assert result.final_step == config.train.steps
  assert all(math.isfinite(v) for v in result.losses.values())
  trained = jax.device_get(restore_state(config, out)[0].params)
  hf.export_hf(trained, exp.model_cfg, str(tmp_path / "hf"))
  section, imported = hf.import_hf(str(tmp_path / "hf"))
  assert section.moe.num_experts == 3
  chex.assert_trees_all_equal(imported, trained)


def test_prune_model_keeps_null_columns_and_shared_experts():
  cfg = ExperimentConfig.from_config(
    tiny_config("/unused", router="null_experts", num_null_experts=2, top_k=3)
  )
  model_cfg = cfg.model
  assert model_cfg.moe_layers == (1,)
  rng = np.random.default_rng(2)
  ffn = {
    "router": rng.normal(size=(32, 6)),
    "wi_gate": rng.normal(size=(4, 32, 32)),
    "wi_up": rng.normal(size=(4, 32, 32)),
    "wo": rng.normal(size=(4, 32, 32)),
    "shared": {"wo": rng.normal(size=(32, 32))},
  }
  params = {"layers_0": {"ffn": {"wo": rng.normal(size=(64, 32))}}, "layers_1": {"ffn": ffn}}
  prob = np.array([5.0, 1.0, 7.0, 3.0, 2.0, 2.0])  # PreMoe keeps experts 2 and 0
  sums = {
    1: {
      "tokens": 20.0,
      "prob": prob,
      "processed": np.ones(4),
      "gate_norm": np.array([1.0, 4.0, 3.0, 2.0]),
    }
  }
  for method, keep, kept in (("premoe", 2, [0, 2]), ("easy_ep", 3, [1, 2, 3]), ("premoe", 1, [2])):
    new_cfg, new, chosen, scores = prune_model(cfg, model_cfg, params, sums, keep, method)
    assert chosen == {1: kept}
    out = new["layers_1"]["ffn"]
    np.testing.assert_array_equal(out["router"][:, :keep], ffn["router"][:, kept])
    np.testing.assert_array_equal(out["router"][:, keep:], ffn["router"][:, 4:])  # nulls
    np.testing.assert_array_equal(out["wo"], ffn["wo"][kept])
    chex.assert_trees_all_equal(out["shared"], ffn["shared"])  # untouched
    chex.assert_trees_all_equal(new["layers_0"], params["layers_0"])
    new_model = ModelConfig.from_config(new_cfg.model)
    assert new_model.moe.num_experts == keep and new_model.moe.top_k == min(3, keep + 2)
    assert cfg.model.moe.num_experts == 4  # the source config is untouched
  np.testing.assert_allclose(scores[1], prob[:4] / 20.0)


def test_prune_rejects_bad_requests_before_any_work(run, tmp_path):
  with pytest.raises(ConfigError, match=r"keep=9 is invalid"):
    prune_run(run, str(tmp_path / "a"), keep=9)
  with pytest.raises(ConfigError, match=r"method='magnitude' is invalid"):
    prune_run(run, str(tmp_path / "a"), keep=2, method="magnitude")
  with pytest.raises(ConfigError, match=r"mesh\.expert"):  # 3 experts do not split over 2
    prune_run(run, str(tmp_path / "a"), keep=3, mesh={"data": -1, "expert": 2})
  assert not os.path.exists(tmp_path / "a" / "checkpoints")
  dense = load_run_config(run).replace_fields({"model.moe_every": 0})
  save_run_config(dense, str(tmp_path / "dense"))  # a config is all it needs to refuse
  with pytest.raises(ConfigError, match=r"model\.moe_every=0 is invalid"):
    prune_run(str(tmp_path / "dense"), str(tmp_path / "a"), keep=2)


# ----------------------------------------------------------------------------- merge


def test_mc_smoe_groups_partition_around_the_most_frequent_experts():
  rng = np.random.default_rng(0)
  for _trial in range(20):
    e = int(rng.integers(2, 10))
    frequency = rng.permutation(e).astype(float)  # distinct
    logits = rng.normal(size=(50, e))
    similarity = router_logit_similarity(logits.T @ logits)
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    for target in range(1, e + 1):
      groups = mc_smoe_groups(frequency, similarity, target)
      assert len(groups) == target
      assert sorted(x for g in groups for x in g) == list(range(e))
      dominant = set(np.argsort(-frequency)[:target].tolist())
      for g in groups:
        heads = dominant.intersection(g)
        assert len(heads) == 1  # one dominant expert per group
        head = heads.pop()
        for x in set(g) - {head}:  # the others joined their most similar dominant expert
          assert similarity[x, head] == max(similarity[x, d] for d in dominant)


def test_duplicates_are_not_both_dominant():
  sim = np.eye(4)
  sim[0, 1] = sim[1, 0] = sim[2, 3] = sim[3, 2] = 1.0
  assert dominant_experts(np.array([5.0, 5.0, 3.0, 3.0]), sim, 2) == [0, 2]
  assert dominant_experts(np.array([5.0, 5.0, 3.0, 3.0]), sim, 3) == [0, 1, 2]


def test_merging_identical_pairs_keeps_the_output(run, source, tmp_path):
  config, model_cfg, params, batches = source
  paired = jax.tree.map(np.array, params)
  for i in model_cfg.moe_layers:
    ffn = paired[f"layers_{i}"]["ffn"]
    for name in ("wi_gate", "wi_up", "wo"):
      ffn[name] = np.repeat(ffn[name][::2], 2, axis=0)  # experts (0, 1) and (2, 3) equal
    ffn["router"] = np.repeat(ffn["router"][:, ::2], 2, axis=1)
  paired_run = str(tmp_path / "paired")
  write_run(config, paired_run, paired)
  out = str(tmp_path / "merged")
  summary = merge_run(
    paired_run, out, num_experts=2, top_k=1, split="validation", num_batches=1, progress=False
  )
  assert summary["groups"] == {"0": [[0, 1], [2, 3]], "1": [[0, 1], [2, 3]]}
  state, _, _, exp = restore_state(load_run_config(out), out)
  assert exp.model_cfg.moe.num_experts == 2 and exp.model_cfg.moe.top_k == 1
  merged = jax.device_get(state.params)
  chex.assert_shape(merged["layers_0"]["ffn"]["wo"], (2, 32, 32))
  tokens = jnp.asarray(batches[1]["inputs"])
  np.testing.assert_allclose(
    logits_of(exp.model_cfg, merged, tokens),
    logits_of(model_cfg, paired, tokens),
    rtol=1e-5,
    atol=1e-5,
  )


def test_merge_cli_writes_a_loadable_run(run, tmp_path):
  from tools.expert_tools import main

  out = str(tmp_path / "merged3")
  assert (
    main(
      [
        "merge",
        "--eval_batches",
        "0",
        "--workdir",
        run,
        "--out",
        out,
        "--num_experts",
        "3",
        "--batches",
        "1",
        "--quiet",
        "--method",
        "mc_smoe",
      ]
    )
    == 0
  )
  with open(os.path.join(out, "merge.json")) as f:
    summary = json.load(f)
  for groups in summary["groups"].values():
    assert len(groups) == 3 and sorted(sum(groups, [])) == [0, 1, 2, 3]
  state, _, _, exp = restore_state(load_run_config(out), out)
  assert exp.model_cfg.moe.num_experts == 3 and exp.model_cfg.moe.top_k == 2
  logits = logits_of(exp.model_cfg, jax.device_get(state.params), jnp.zeros((2, 8), jnp.int32))
  assert np.isfinite(logits).all()
  assert (
    main(
      [
        "merge",
        "--eval_batches",
        "0",
        "--workdir",
        run,
        "--out",
        str(tmp_path / "x"),
        "--num_experts",
        "5",
        "--method",
        "mc_smoe",
      ]
    )
    == 2
  )


def test_contiguous_merge_without_batches_is_the_uniform_mean_of_index_ranges(
  run, source, tmp_path
):
  from tools.expert_tools import main

  _, _, params, _ = source
  out = str(tmp_path / "merged2")
  assert (
    main(
      [
        "merge",
        "--eval_batches",
        "0",
        "--workdir",
        run,
        "--out",
        out,
        "--num_experts",
        "2",
        "--batches",
        "0",
        "--method",
        "contiguous",
        "--quiet",
      ]
    )
    == 0
  )
  with open(os.path.join(out, "merge.json")) as f:
    assert json.load(f)["groups"] == {"0": [[0, 1], [2, 3]], "1": [[0, 1], [2, 3]]}
  state, _, _, exp = restore_state(load_run_config(out), out)
  assert exp.model_cfg.moe.num_experts == 2
  merged = jax.device_get(state.params)
  for i in (0, 1):
    old, new = params[f"layers_{i}"]["ffn"], merged[f"layers_{i}"]["ffn"]
    for name in ("wi_gate", "wi_up", "wo"):
      np.testing.assert_allclose(
        new[name], np.stack([old[name][0:2].mean(0), old[name][2:4].mean(0)]), rtol=1e-6
      )
    np.testing.assert_allclose(
      new["router"],
      np.stack([old["router"][:, 0:2].mean(1), old["router"][:, 2:4].mean(1)], axis=1),
      rtol=1e-6,
    )
  # mc_smoe needs routing statistics; 3 does not divide 4 for contiguous groups
  assert (
    main(
      [
        "merge",
        "--eval_batches",
        "0",
        "--workdir",
        run,
        "--out",
        str(tmp_path / "y"),
        "--num_experts",
        "2",
        "--batches",
        "0",
        "--method",
        "mc_smoe",
      ]
    )
    == 2
  )
  assert (
    main(
      [
        "merge",
        "--eval_batches",
        "0",
        "--workdir",
        run,
        "--out",
        str(tmp_path / "z"),
        "--num_experts",
        "3",
        "--batches",
        "0",
        "--method",
        "contiguous",
      ]
    )
    == 2
  )


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
  "sub, flags",
  [
    (None, ["stats", "prune", "merge"]),
    pytest.param(
      "stats",
      ["--workdir", "--out", "--split", "--batches", "--super_threshold"],
      marks=pytest.mark.slow,
    ),
    pytest.param(
      "prune", ["--keep", "--method", "easy_ep", "premoe", "--mesh"], marks=pytest.mark.slow
    ),
    ("merge", ["--num_experts", "--top_k", "--batches", "--method", "mc_smoe", "contiguous"]),
  ],
)
def test_cli_help(sub, flags):
  argv = [sys.executable, TOOL] + ([sub] if sub else []) + ["--help"]
  out = subprocess.run(
    argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO)
  )  # this checkout's moejax
  assert out.returncode == 0, out.stderr
  for flag in flags:
    assert flag in out.stdout
