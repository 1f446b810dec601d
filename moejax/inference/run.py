"""A run's params for generation / evaluation: config.json + a checkpoint, on a mesh."""

from __future__ import annotations

import math

import jax

from moejax.training.experiment import Experiment
from moejax.training.workdir import load_run_config, restore_state


def load_run(
  workdir: str,
  step: int | None = None,
  one_device: bool = False,
  tokenizer: str | None = None,
  data: dict | None = None,
) -> tuple[Experiment, dict, int]:
  """(experiment, unrolled params, step) of `workdir` at `step` (default: the newest).

  The mesh is the run's ``mesh`` section (over the first data * expert * model devices
  when it names no -1 axis), or a single device with `one_device`; `tokenizer` overrides
  ``data.tokenizer``.
  """
  overrides = {"mesh.data": 1, "mesh.expert": 1, "mesh.model": 1} if one_device else {}
  if tokenizer is not None:
    overrides["data.tokenizer"] = tokenizer
  overrides.update({f"data.{k}": v for k, v in (data or {}).items() if v is not None})
  config = load_run_config(workdir).replace_fields(overrides)
  sizes = config.mesh.sizes().values()  # validated once, here; restore_state takes it as is
  devices = None
  if -1 not in sizes and math.prod(sizes) <= jax.device_count():
    devices = jax.devices()[: math.prod(sizes)]
  state, _, step, exp = restore_state(config, workdir, step, devices=devices)
  return exp, state.params, step
