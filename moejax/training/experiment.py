"""Everything derived from a config before any array exists: mesh, model, optimizer,
and where every piece of the train state lives. Shared by the trainer and the tools."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from moejax.config import ExperimentConfig, ModelConfig
from moejax.errors import config_error
from moejax.models import Transformer
from moejax.parallel import batch_sharding, logical_axis_rules, make_mesh, validate_mesh_for_moe
from moejax.training.optim import learning_rate_schedule, make_optimizer
from moejax.training.state import TrainState, state_shardings


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: ExperimentConfig
  mesh: jax.sharding.Mesh
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any  # NamedSharding tree shaped like TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying those shardings
  batch_sharding: jax.sharding.NamedSharding

  @property
  def model_cfg(self) -> ModelConfig:
    return self.config.model


def check_batch_divides(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> None:
  """The batch rows are split over mesh axes ('data', 'expert') and over the processes;
  ConfigError naming data.global_batch_size unless both divide it."""
  rows = mesh.shape["data"] * mesh.shape["expert"]
  batch = cfg.data.global_batch_size
  if batch % rows or batch % jax.process_count():
    raise config_error(
      "data.global_batch_size",
      batch,
      f"must be divisible by the {rows} batch shards (mesh.data x mesh.expert = "
      f"{mesh.shape['data']} x {mesh.shape['expert']}) and the {jax.process_count()} processes",
    )


def build_experiment(config, devices=None) -> Experiment:
  """Validates `config` (an ExperimentConfig, or a ConfigDict parsed here with
  ``ExperimentConfig.from_config``, raising ConfigError naming the field) and derives the
  rest. `devices`: the devices the mesh spans (default: all), e.g. one for debugging."""
  cfg = ExperimentConfig.from_config(config)
  mesh = make_mesh(cfg.mesh, devices=devices)
  validate_mesh_for_moe(mesh, cfg.model.moe)
  model = Transformer(cfg.model, mesh=mesh)
  tx = make_optimizer(cfg.train)
  check_batch_divides(cfg, mesh)
  rules = logical_axis_rules(fsdp=cfg.train.fsdp)
  shardings, abstract = state_shardings(model, tx, cfg.data.seq_len, mesh, rules)
  return Experiment(
    config=cfg,
    mesh=mesh,
    model=model,
    tx=tx,
    schedule=learning_rate_schedule(cfg.train),
    state_shardings=shardings,
    abstract_state=abstract,
    batch_sharding=batch_sharding(mesh),
  )
