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
from etils import epath

from moejax.config import ExperimentConfig, base_config
from moejax.data import make_train_iterator
from moejax.errors import ConfigError
from moejax.models.layer_stack import stack_layers, unrolled_config, unstack_layers
from moejax.training.checkpoint import Checkpointer
from moejax.training.experiment import Experiment, build_experiment
from moejax.training.paths import as_path, write_text_atomic
from moejax.training.state import TrainState

CONFIG_FILE = "config.json"


def checkpoint_dir(path) -> epath.Path:
  """Accepts a run workdir (holding checkpoints/) or a checkpoints directory."""
  path = as_path(path)
  inner = path / "checkpoints"
  return inner if inner.is_dir() else path


def save_run_config(config: ExperimentConfig, workdir) -> None:
  """Writes `config` as ``workdir/config.json`` (its ConfigDict form as JSON)."""
  cd = config.to_config_dict()
  write_text_atomic(as_path(workdir) / CONFIG_FILE, cd.to_json(indent=2, sort_keys=True))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/tiny_cpu.py (as --config loads it), or
  a run's ``config.json``."""
  if os.fspath(path).endswith(".json"):
    return load_config_json(path)
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


def _read_config_json(path) -> tuple[ml_collections.ConfigDict, ExperimentConfig]:
  """(ConfigDict, parsed config) of a run's ``config.json`` over ``base_config()``: fields
  added since the run was written take their defaults, so older runs keep loading. Errors
  name the file."""
  path = as_path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: pass --config with the run's config file")
  try:
    stored = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not a valid config.json: {e}") from None
  if not isinstance(stored, dict):
    raise ConfigError(f"{path} is not a valid config.json: not a JSON object")
  config = ml_collections.ConfigDict(_merge(base_config().to_dict(), stored))
  try:
    return config, ExperimentConfig.from_config(config)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def load_config_json(path) -> ml_collections.ConfigDict:
  """A run's ``config.json`` as a validated ConfigDict (a ``--config`` file that
  command-line overrides apply to; ``_read_config_json``)."""
  return _read_config_json(path)[0]


def load_run_config(workdir) -> ExperimentConfig:
  """The parsed ``ExperimentConfig`` of ``workdir/config.json`` (``_read_config_json``)."""
  return _read_config_json(as_path(workdir) / CONFIG_FILE)[1]


def restore_state(
  config, workdir, step: int | None = None, devices=None, unrolled: bool = True
) -> tuple[TrainState, dict, int, Experiment]:
  """Restores (state, meta, step, experiment) from the newest verified step (or the given
  one); an unusable checkpoint is a CheckpointError naming its directory.

  unrolled: a scanned run (model.scan_layers) comes back in the ``layers_{i}`` form with
  the experiment of its unrolled config (``moejax.models.layer_stack``).
  """
  exp = build_experiment(config, devices=devices)
  ckpt = Checkpointer(checkpoint_dir(workdir), keep=1_000_000, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {workdir}")
    if step is None:  # the newest that loads and verifies, as the trainer resumes
      state, meta, step = ckpt.restore_newest(exp.abstract_state, quarantine=False)
    elif step not in steps:
      raise FileNotFoundError(f"step {step} is not in {workdir}; available: {steps}")
    else:
      state, meta = ckpt.restore_verified(step, exp.abstract_state)
  finally:
    ckpt.close()
  if unrolled and exp.model_cfg.scan_layers:
    exp = build_experiment(unrolled_config(exp.config), devices=devices)
    state = jax.device_put(unstack_layers(state, exp.model_cfg), exp.state_shardings)
  return state, meta, step, exp


def fresh_state(exp: Experiment, params, step: int = 0, opt_state=None) -> TrainState:
  """A TrainState at `step` holding `params` (unrolled ``layers_{i}`` is fine for a scanned
  config) on `exp`'s shardings, with a fresh optimizer state unless given."""
  params, opt_state = stack_layers((params, opt_state), exp.model_cfg)
  params = jax.device_put(params, exp.state_shardings.params)
  if opt_state is None:
    opt_state = jax.jit(exp.tx.init, out_shardings=exp.state_shardings.opt_state)(params)
  return TrainState(
    step=jax.numpy.asarray(step, jax.numpy.int32), params=params, opt_state=opt_state
  )


def write_run(
  config, workdir: str, params, step: int = 0, host_data_states: dict | None = None, opt_state=None
) -> int:
  """Writes `workdir` as a run at `step` holding `params` (fresh optimizer state unless
  given) and fresh input positions; returns the step. Refuses a workdir with checkpoints.
  params / opt_state may be unrolled (``layers_{i}``) for a scanned config."""
  exp = build_experiment(config)
  ckpt_dir = as_path(workdir) / "checkpoints"
  if ckpt_dir.is_dir() and list(ckpt_dir.iterdir()):
    raise FileExistsError(f"{workdir} already holds checkpoints; choose a fresh workdir")
  state = fresh_state(exp, params, step, opt_state)
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
