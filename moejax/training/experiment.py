"""Everything derived from a config before any array exists: mesh, model, optimizer,
and where every piece of the train state lives. Shared by the trainer and the tools."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from moejax.config import ModelConfig, validate_config
from moejax.models import Transformer
from moejax.parallel import batch_sharding, logical_axis_rules, make_mesh, validate_mesh_for_moe
from moejax.training.optim import learning_rate_schedule, make_optimizer
from moejax.training.state import TrainState, state_shardings


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: Any
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any  # NamedSharding tree shaped like TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying those shardings
  batch_sharding: jax.sharding.NamedSharding


def build_experiment(config, devices=None) -> Experiment:
  """Validates `config` (raising ConfigError naming the field) and derives the rest.

  `devices`: the devices the mesh spans (default: all), e.g. one device for debugging.
  """
  validate_config(config)
  model_cfg = ModelConfig.from_config(config.model)
  mesh = make_mesh(config.mesh, devices=devices)
  validate_mesh_for_moe(mesh, model_cfg.moe)
  model = Transformer(model_cfg, mesh=mesh)
  tx = make_optimizer(config.train)
  rules = logical_axis_rules(fsdp=bool(config.train.get("fsdp", False)))
  shardings, abstract = state_shardings(model, tx, config.data.seq_len, mesh, rules)
  return Experiment(config=config, model_cfg=model_cfg, mesh=mesh, model=model, tx=tx,
                    schedule=learning_rate_schedule(config.train), state_shardings=shardings,
                    abstract_state=abstract, batch_sharding=batch_sharding(mesh))
