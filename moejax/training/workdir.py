"""The run directory (workdir): ``config.json`` (the full experiment config) and
``checkpoints/<step>/`` (Orbax). The trainer writes it; the tools read the config back,
restore params on the mesh the config names (or any other), and can write a fresh run
whose step-0 checkpoint holds given params (``moejax-train --workdir`` fine-tunes it).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_collections

from moejax.config import ExperimentConfig, base_config
from moejax.data import make_train_iterator
from moejax.models.layer_stack import stack_layers, unrolled_config, unstack_layers
from moejax.training.checkpoint import Checkpointer
from moejax.training.experiment import Experiment, build_experiment
from moejax.training.state import TrainState

CONFIG_FILE = "config.json"


def checkpoint_dir(path: str) -> str:
  """Accepts a run workdir (holding checkpoints/) or a checkpoints directory."""
  path = os.path.abspath(path)  # Orbax needs absolute paths
  inner = os.path.join(path, "checkpoints")
  return inner if os.path.isdir(inner) else path


def save_run_config(config, workdir: str) -> None:
  """Writes `config` (an ExperimentConfig or a ConfigDict) as ``workdir/config.json``."""
  if isinstance(config, ExperimentConfig):
    config = config.to_config_dict()
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/tiny_cpu.py (as --config loads it)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _merge(base: dict, given: dict) -> dict:
  out = dict(base)
  for k, v in given.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's ``config.json`` over ``base_config()``: fields added since the run was
  written take their defaults, so older runs keep loading."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass --config with the run's config file")
  with open(path) as f:
    stored = json.load(f)
  return ml_collections.ConfigDict(_merge(base_config().to_dict(), stored))


def restore_state(
  config, workdir: str, step: int | None = None, devices=None, unrolled: bool = True
) -> tuple[TrainState, dict, int, Experiment]:
  """Restores (state, meta, step, experiment) from the newest (or given) verified step.

  unrolled: a scanned run (model.scan_layers) comes back in the ``layers_{i}`` form with
  the experiment of its unrolled config (``moejax.models.layer_stack``).
  """
  exp = build_experiment(config, devices=devices)
  ckpt = Checkpointer(checkpoint_dir(workdir), keep=1_000_000, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {workdir}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"step {step} is not in {workdir}; available: {steps}")
    state, meta = ckpt.restore(step, exp.abstract_state)
  finally:
    ckpt.close()
  if unrolled and exp.model_cfg.scan_layers:
    exp = build_experiment(unrolled_config(config), devices=devices)
    state = jax.device_put(unstack_layers(state, exp.model_cfg), exp.state_shardings)
  return state, meta, step, exp


def write_run(
  config, workdir: str, params, step: int = 0, host_data_states: dict | None = None, opt_state=None
) -> int:
  """Writes `workdir` as a run at `step` holding `params` (fresh optimizer state unless
  given) and fresh input positions; returns the step. Refuses a workdir with checkpoints.
  params / opt_state may be unrolled (``layers_{i}``) for a scanned config."""
  exp = build_experiment(config)
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{workdir} already holds checkpoints; choose a fresh workdir")
  params, opt_state = stack_layers((params, opt_state), exp.model_cfg)
  params = jax.device_put(params, exp.state_shardings.params)
  if opt_state is None:
    opt_state = jax.jit(exp.tx.init, out_shardings=exp.state_shardings.opt_state)(params)
  state = TrainState(
    step=jax.numpy.asarray(step, jax.numpy.int32), params=params, opt_state=opt_state
  )
  if host_data_states is None:
    n = jax.process_count()
    host_data_states = {
      str(i): make_train_iterator(exp.config.data, i, n).get_state() for i in range(n)
    }
  save_run_config(exp.config, workdir)
  ckpt = Checkpointer(ckpt_dir, keep=1_000_000, async_save=False)
  ckpt.save_all_hosts(step, state, host_data_states)
  ckpt.close()
  return step
