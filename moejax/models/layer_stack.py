"""Scanned layers: the blocks' repeating unit and the stacked <-> unrolled param trees.

With ``model.scan_layers``, U units of `unit` layers from `start` (first_moe_layer and
moe_every for MoE, 0 and 1 for dense) run under ``nn.scan``, params under
``scanned_layers/block_{j}`` with a leading [U] 'layers' axis (unit u, block j is layer
start + u * unit + j); the layers before and after stay ``layers_{i}``.
``stack_layers`` / ``unstack_layers`` convert any tree holding the params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moejax.config import ExperimentConfig

SCAN_KEY = "scanned_layers"


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  start: int  # first scanned layer
  unit: int  # layers per scanned unit
  num_units: int  # U

  @property
  def scanned(self) -> range:
    return range(self.start, self.start + self.unit * self.num_units)

  def layer(self, u: int, j: int) -> int:
    return self.start + u * self.unit + j


def scan_plan(cfg) -> ScanPlan:
  """How `cfg` (a ModelConfig) splits into prefix / scanned units / suffix."""
  start, unit = (cfg.first_moe_layer, cfg.moe_every) if cfg.moe_every > 0 else (0, 1)
  return ScanPlan(start, unit, (cfg.num_layers - start) // unit)


def _is_unrolled(plan: ScanPlan):
  first = f"layers_{plan.start}"
  return lambda x: isinstance(x, Mapping) and first in x and SCAN_KEY not in x


def _is_stacked(x) -> bool:
  return isinstance(x, Mapping) and SCAN_KEY in x


def stack_layers(tree: Any, cfg) -> Any:
  """Unrolled -> scanned form of every params-shaped dict in `tree` (identity unless
  ``cfg.scan_layers``)."""
  plan = scan_plan(cfg)
  if not cfg.scan_layers or plan.num_units == 0:
    return tree

  def stack(node):
    if not _is_unrolled(plan)(node):
      return node
    out = {k: v for k, v in node.items() if k not in {f"layers_{i}" for i in plan.scanned}}
    out[SCAN_KEY] = {
      f"block_{j}": jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[node[f"layers_{plan.layer(u, j)}"] for u in range(plan.num_units)],
      )
      for j in range(plan.unit)
    }
    return out

  return jax.tree.map(stack, tree, is_leaf=_is_unrolled(plan))


def unstack_layers(tree: Any, cfg) -> Any:
  """Scanned -> unrolled (``layers_{i}``) form of every params-shaped dict in `tree`."""
  plan = scan_plan(cfg)

  def unstack(node):
    if not _is_stacked(node):
      return node
    out = {k: v for k, v in node.items() if k != SCAN_KEY}
    for j, block in ((int(k.split("_")[1]), v) for k, v in node[SCAN_KEY].items()):
      for u in range(plan.num_units):
        out[f"layers_{plan.layer(u, j)}"] = jax.tree.map(lambda x, u=u: x[u], block)
    return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))

  return jax.tree.map(unstack, tree, is_leaf=_is_stacked)


def _layer_order(key: str):
  """Sort key restoring the unrolled order: embed, layers_0..N-1, the rest."""
  if key.startswith("layers_") and key[7:].isdigit():
    return (1, int(key[7:]), "")
  return (0 if key == "embed" else 2, 0, key)


def unrolled_config(config: ExperimentConfig) -> ExperimentConfig:
  """`config` with ``model.scan_layers=False`` (the form the converters and analysis tools
  read)."""
  return dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=False))
