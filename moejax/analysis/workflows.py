"""End-to-end tool actions on run workdirs: stats report, pruning, merging.

Each reads a run written by ``moejax.train`` (``config.json`` + Orbax checkpoints),
analyses its params on the single-device model over the first batches of a data split
and writes a report directory or a new run (``write_run``: a step-0 checkpoint that
``moejax.train`` resumes, i.e. fine-tunes).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from moejax.analysis import plots, stats
from moejax.analysis.collect import collect_sums, split_batches
from moejax.analysis.merge import merge_model, merged_config
from moejax.analysis.prune import SCORERS, check_keep, prune_model, pruned_config
from moejax.errors import config_error


def run_config(workdir: str):
  """(experiment config, ModelConfig) of a run, validated; raises for a dense model."""
  from moejax.config import ModelConfig
  from moejax.convert.run_io import load_run_config

  config = load_run_config(workdir)
  # Tools work on the unrolled layers_{i} params (restore_state unstacks scanned runs).
  model_cfg = dataclasses.replace(ModelConfig.from_config(config.model), scan_layers=False)
  if model_cfg.moe is None:
    raise config_error("model.moe_every", model_cfg.moe_every,
                       f"{workdir} is a dense model; the expert tools need MoE layers (>= 1)")
  return config, model_cfg


def load_params(config, workdir: str, step: int | None = None):
  """(host params, step) of the newest (or given) checkpoint of the run."""
  from moejax.convert.run_io import restore_state

  state, _, step, _ = restore_state(config, workdir, step)
  return jax.device_get(state.params), step


def collect_run(config, model_cfg, params, split: str, num_batches: int,
                progress: bool = True) -> dict[int, dict]:
  batches = split_batches(config, split, num_batches)
  return collect_sums(model_cfg, params, batches, num_batches, progress)


def write_stats(model_cfg, sums, out_dir: str,
                super_threshold: float = stats.DEFAULT_SUPER_THRESHOLD, **meta) -> dict:
  """Writes report.json and the PNG plots into out_dir; returns the report."""
  report = stats.build_report(sums, model_cfg, super_threshold, **meta)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  report["files"] = plots.write_plots(report, out_dir)
  return report


def stats_run(workdir: str, out_dir: str, split: str = "validation", num_batches: int = 8,
              step: int | None = None, super_threshold: float = stats.DEFAULT_SUPER_THRESHOLD,
              progress: bool = True) -> dict:
  config, model_cfg = run_config(workdir)
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  return write_stats(model_cfg, sums, out_dir, super_threshold, workdir=workdir, step=step,
                     split=split, batches=num_batches)


def target_config(new_config, out: str, mesh: dict | None = None):
  """Applies a mesh override to the new run's config and checks it (and that `out` holds no
  checkpoints) before any expensive work. ConfigError names the failing field."""
  from moejax.config import ModelConfig, validate_config
  from moejax.parallel import make_mesh, validate_mesh_for_moe

  ckpts = os.path.join(out, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    raise FileExistsError(f"{out} already holds checkpoints; choose a fresh --out")
  if mesh:
    with new_config.unlocked():
      for axis, size in mesh.items():
        new_config.mesh[axis] = size
  validate_config(new_config)
  validate_mesh_for_moe(make_mesh(new_config.mesh), ModelConfig.from_config(new_config.model).moe)
  return new_config


def _write_new_run(new_config, out: str, params, summary: dict, name: str) -> dict:
  """write_run (a step-0 checkpoint) plus a JSON summary `name` in the new run."""
  from moejax.convert.run_io import write_run

  write_run(new_config, out, params)
  with open(os.path.join(out, name), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def prune_run(workdir: str, out: str, keep: int, method: str = "easy_ep",
              split: str = "train", num_batches: int = 4, step: int | None = None,
              mesh: dict | None = None, progress: bool = True) -> dict:
  """Prunes every MoE layer to its `keep` best experts; writes run `out`; returns a summary."""
  config, model_cfg = run_config(workdir)
  check_keep(keep, model_cfg)
  if method not in SCORERS:
    raise config_error("method", method, f"allowed: {sorted(SCORERS)}")
  target = target_config(pruned_config(config, keep), out, mesh)
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  _, new_params, kept, scores = prune_model(config, model_cfg, params, sums, keep, method)
  summary = {"source": workdir, "step": step, "method": method, "keep": keep,
             "top_k": int(target.model.moe.top_k),
             "kept_experts": {str(i): k for i, k in kept.items()},
             "scores": {str(i): s.tolist() for i, s in scores.items()}}
  return _write_new_run(target, out, new_params, summary, "prune.json")


def merge_run(workdir: str, out: str, num_experts: int, top_k: int | None = None,
              split: str = "train", num_batches: int = 4, step: int | None = None,
              mesh: dict | None = None, progress: bool = True) -> dict:
  """MC-SMoE merges every MoE layer into `num_experts`; writes run `out`; returns a summary."""
  config, model_cfg = run_config(workdir)
  e = model_cfg.moe.num_experts
  if not isinstance(num_experts, int) or not 1 <= num_experts <= e:
    raise config_error("num_experts", num_experts,
                       f"must be an int in [1, model.moe.num_experts={e}]")
  target = target_config(merged_config(config, num_experts, top_k), out, mesh)
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  _, merged, groups, frequency = merge_model(config, model_cfg, params, sums, num_experts,
                                             top_k)
  summary = {"source": workdir, "step": step, "num_experts": num_experts,
             "top_k": int(target.model.moe.top_k),
             "groups": {str(i): g for i, g in groups.items()},
             "frequency": {str(i): f.tolist() for i, f in frequency.items()}}
  return _write_new_run(target, out, merged, summary, "merge.json")
