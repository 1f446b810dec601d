"""The stats report on a run workdir (``config.json`` + Orbax checkpoints), and the pieces
the compression workflows share: the run's config and params, routing sums over the first
batches of a data split."""

from __future__ import annotations

import dataclasses
import json

import jax

from moejax.analysis import plots, stats
from moejax.analysis.collect import collect_sums, split_batches
from moejax.config import ExperimentConfig, ModelConfig
from moejax.errors import config_error
from moejax.training.paths import as_path
from moejax.training.workdir import load_run_config, restore_state


def run_config(workdir: str) -> tuple[ExperimentConfig, ModelConfig]:
  """(experiment config, its unrolled ModelConfig) of a run; raises for a dense model."""
  config = load_run_config(workdir)
  # Tools work on the unrolled layers_{i} params (restore_state unstacks scanned runs).
  model_cfg = dataclasses.replace(config.model, scan_layers=False)
  if model_cfg.moe is None:
    raise config_error(
      "model.moe_every",
      model_cfg.moe_every,
      f"{workdir} is a dense model; the expert tools need MoE layers (>= 1)",
    )
  return config, model_cfg


def load_params(config: ExperimentConfig, workdir: str, step: int | None = None):
  """(host params, step) of the newest (or given) checkpoint of the run."""
  state, _, step, _ = restore_state(config, workdir, step)
  return jax.device_get(state.params), step


def collect_run(
  config: ExperimentConfig, model_cfg, params, split: str, num_batches: int, progress: bool = True
) -> dict[int, dict]:
  batches = split_batches(config, split, num_batches)
  return collect_sums(model_cfg, params, batches, num_batches, progress)


def write_stats(
  model_cfg, sums, out_dir: str, super_threshold: float = stats.DEFAULT_SUPER_THRESHOLD, **meta
) -> dict:
  """Writes report.json and the PNG plots into out_dir; returns the report."""
  report = stats.build_report(sums, model_cfg, super_threshold, **meta)
  out = as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=1))
  report["files"] = plots.write_plots(report, out_dir)
  return report


def stats_run(
  workdir: str,
  out_dir: str,
  split: str = "validation",
  num_batches: int = 8,
  step: int | None = None,
  super_threshold: float = stats.DEFAULT_SUPER_THRESHOLD,
  progress: bool = True,
) -> dict:
  config, model_cfg = run_config(workdir)
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  return write_stats(
    model_cfg,
    sums,
    out_dir,
    super_threshold,
    workdir=workdir,
    step=step,
    split=split,
    batches=num_batches,
  )
