"""Resume hygiene: what changed between a run's stored ``config.json`` and the config it is
resumed (or initialised) with. Changes that alter parameter shapes are refused in one line
naming the field; others are listed, with a warning when the LR schedule moves."""

from __future__ import annotations

import logging

import jax

from moejax.config import ExperimentConfig
from moejax.errors import ConfigError
from moejax.training.state import abstract_params

log = logging.getLogger(__name__)

# train.* fields that change the learning rate at a given step (warmup + cosine decay)
SCHEDULE_FIELDS = ("train.steps", "train.learning_rate", "train.warmup_steps", "train.end_lr_ratio")


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def changed_fields(old: ExperimentConfig, new: ExperimentConfig) -> dict[str, tuple]:
  """{'model.moe.num_experts': (8, 4), ...} for every dotted field whose value differs."""
  a, b = (_flatten(c.to_config_dict().to_dict()) for c in (old, new))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def param_shapes(config) -> dict[str, tuple]:
  """{param path: shape} of the model of an experiment config (parsed here if a
  ConfigDict), without allocating."""
  tree = abstract_params(ExperimentConfig.from_config(config).model)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in leaves}


def _changes_shapes(stored: ExperimentConfig, field: str, value, reference: dict) -> bool:
  try:
    return param_shapes(stored.replace_fields({field: value})) != reference
  except (ConfigError, ValueError, TypeError):  # invalid on its own: it is a model change
    return True


def check_compatible(
  stored: ExperimentConfig, new: ExperimentConfig, what: str = "resume"
) -> list[str]:
  """Raises ConfigError (one line, naming the first field) if `new` changes the parameter
  shapes of the run configured by `stored`; else returns the changed fields, logged."""
  changes = changed_fields(stored, new)
  model_changes = {k: v for k, v in changes.items() if k.startswith("model.")}
  reference = param_shapes(stored) if model_changes else None
  if model_changes and param_shapes(new) != reference:
    culprits = [
      k for k, (_, v) in model_changes.items() if _changes_shapes(stored, k, v, reference)
    ]
    field = (culprits or sorted(model_changes))[0]
    old, value = model_changes[field]
    raise ConfigError(
      f"{field}={value!r} differs from the run's {old!r} and changes parameter shapes: "
      f"cannot {what} this run with it (use a fresh --workdir, or moejax-convert / "
      "moejax-experts to change the model)"
    )
  if changes:
    log.warning(
      "Config changed since the run was written: %s",
      ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
    )
  moved = [k for k in SCHEDULE_FIELDS if k in changes]
  if moved:
    log.warning("The learning-rate schedule changes (%s) from the resumed step on", moved)
  return list(changes)
