"""Compression on run workdirs: prune, merge or upcycle a run into a new run.

Each reads a run written by ``moejax-train`` (``config.json`` + Orbax checkpoints) and
writes a new run (``write_run``: a step-0 checkpoint that ``moejax-train`` resumes, i.e.
fine-tunes). Outputs that hold checkpoints are refused before any expensive work.
"""

from __future__ import annotations

import dataclasses
import json

import jax

from moejax.analysis.workflows import collect_run, load_params, run_config
from moejax.compress.merge import METHODS, merge_model, merged_config
from moejax.compress.prune import SCORERS, check_keep, prune_model, pruned_config
from moejax.compress.upcycle import upcycle_params
from moejax.config import ExperimentConfig
from moejax.errors import ConfigError, config_error
from moejax.parallel import make_mesh, validate_mesh_for_moe
from moejax.training.paths import as_path
from moejax.training.state import abstract_params
from moejax.training.workdir import load_run_config, restore_state, write_run

UPCYCLE_MOE_FIELDS = (
  "num_experts",
  "top_k",
  "router",
  "router_order",
  "capacity_factor",
  "dropless",
)


def target_config(
  new_config: ExperimentConfig, out: str, mesh: dict | None = None
) -> ExperimentConfig:
  """Applies a mesh override to the new run's config and checks it (and that `out` holds no
  checkpoints) before any expensive work. ConfigError names the failing field."""
  ckpts = as_path(out) / "checkpoints"
  if ckpts.is_dir() and any(ckpts.iterdir()):
    raise FileExistsError(f"{out} already holds checkpoints; choose a fresh --out")
  cfg = new_config.replace_fields({f"mesh.{a}": n for a, n in (mesh or {}).items()})
  validate_mesh_for_moe(make_mesh(cfg.mesh), cfg.model.moe)
  return cfg


def _write_new_run(
  new_config: ExperimentConfig, out: str, params, summary: dict, name: str
) -> dict:
  """write_run (a step-0 checkpoint) plus a JSON summary `name` in the new run."""
  write_run(new_config, out, params)
  (as_path(out) / name).write_text(json.dumps(summary, indent=1))
  return summary


def prune_run(
  workdir: str,
  out: str,
  keep: int,
  method: str = "easy_ep",
  split: str = "train",
  num_batches: int = 4,
  step: int | None = None,
  mesh: dict | None = None,
  progress: bool = True,
) -> dict:
  """Prunes every MoE layer to its `keep` best experts; writes run `out`; returns a summary."""
  config, model_cfg = run_config(workdir)
  check_keep(keep, model_cfg)
  if method not in SCORERS:
    raise config_error("method", method, f"allowed: {sorted(SCORERS)}")
  target = target_config(pruned_config(config, keep), out, mesh)
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  _, new_params, kept, scores = prune_model(config, model_cfg, params, sums, keep, method)
  summary = {
    "source": workdir,
    "step": step,
    "method": method,
    "keep": keep,
    "top_k": int(target.model.moe.top_k),
    "kept_experts": {str(i): k for i, k in kept.items()},
    "scores": {str(i): s.tolist() for i, s in scores.items()},
  }
  return _write_new_run(target, out, new_params, summary, "prune.json")


def merge_run(
  workdir: str,
  out: str,
  num_experts: int,
  top_k: int | None = None,
  split: str = "train",
  num_batches: int = 4,
  step: int | None = None,
  mesh: dict | None = None,
  progress: bool = True,
  method: str = "mc_smoe",
) -> dict:
  """Merges every MoE layer into `num_experts` (``compress.merge.merge_model``, `method`
  'mc_smoe' or 'contiguous'), weighted by the selection frequency over `num_batches`
  batches of `split` (0 batches: uniform, contiguous only); writes run `out`; returns a
  summary."""
  if method not in METHODS:
    raise config_error("method", method, f"allowed: {list(METHODS)}")
  config, model_cfg = run_config(workdir)
  e = model_cfg.moe.num_experts
  if not isinstance(num_experts, int) or not 1 <= num_experts <= e:
    raise config_error(
      "num_experts", num_experts, f"must be an int in [1, model.moe.num_experts={e}]"
    )
  target = target_config(merged_config(config, num_experts, top_k), out, mesh)
  params, step = load_params(config, workdir, step)
  sums = (
    collect_run(config, model_cfg, params, split, num_batches, progress) if num_batches else None
  )
  _, merged, groups, frequency = merge_model(
    config, model_cfg, params, sums, num_experts, top_k, method
  )
  summary = {
    "source": workdir,
    "step": step,
    "method": method,
    "num_experts": num_experts,
    "top_k": int(target.model.moe.top_k),
    "groups": {str(i): g for i, g in groups.items()},
    "frequency": {str(i): f.tolist() for i, f in frequency.items()},
  }
  return _write_new_run(target, out, merged, summary, "merge.json")


def upcycle_run(
  workdir: str,
  out: str,
  moe: dict,
  moe_every: int = 1,
  first_moe_layer: int = 0,
  seed: int = 0,
  step: int | None = None,
  config: ExperimentConfig | None = None,
) -> dict:
  """Sparse upcycling of dense run `workdir` into MoE run `out`: `moe` overrides the
  ``model.moe`` fields (None values are skipped), expert_d_ff = the dense d_ff. `config`:
  the dense run's config (default: its config.json)."""
  dense_config = load_run_config(workdir) if config is None else config
  state, _, step, exp = restore_state(dense_config, workdir, step)
  if exp.model_cfg.moe_every:
    raise ConfigError(
      f"{workdir} is already an MoE model (model.moe_every="
      f"{exp.model_cfg.moe_every}); upcycle takes a dense run"
    )
  overrides = {f"model.moe.{k}": v for k, v in moe.items() if v is not None}
  overrides.update(
    {
      "model.moe.expert_d_ff": dense_config.model.d_ff,
      "model.moe_every": moe_every,
      "model.first_moe_layer": first_moe_layer,
    }
  )
  config = target_config(dense_config.replace_fields(overrides), out)
  # the unrolled layers_{i} form (write_run stacks it for a scanned config)
  model_cfg = dataclasses.replace(config.model, scan_layers=False)
  params = upcycle_params(
    jax.device_get(state.params), model_cfg, abstract_params(model_cfg), jax.random.key(seed)
  )
  write_run(config, out, params)
  return {"source": workdir, "step": step, "num_experts": model_cfg.moe.num_experts}
