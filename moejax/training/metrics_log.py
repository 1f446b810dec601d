"""Metrics sinks: a JSONL file in the workdir and a one-line console summary.

Only the primary process (index 0) writes; other hosts get a no-op writer.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
  """Arrays -> floats or lists; non-finite floats -> 'nan'/'inf' strings (valid JSON)."""
  value = np.asarray(value)
  if value.ndim == 0:
    v = float(value)
    return v if math.isfinite(v) else str(v)
  return [to_jsonable(v) for v in value]


class MetricsWriter:
  """Appends one JSON object per record to ``<workdir>/metrics.jsonl``."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps({k: to_jsonable(v) for k, v in record.items()})
    with open(self.path, "a") as f:
      f.write(line + "\n")
      f.flush()


def summarize(metrics: dict, keys: tuple[str, ...]) -> str:
  """'loss=2.31 ce_loss=2.29 ...' for the scalar `keys` present in `metrics`."""
  parts = []
  for key in keys:
    if key in metrics and np.ndim(metrics[key]) == 0:
      parts.append(f"{key.split('/')[-1]}={float(metrics[key]):.4g}")
  return " ".join(parts)


def router_summary(metrics: dict) -> dict[str, float]:
  """Mean over MoE layers of dropped fraction / experts per token, and the worst load."""
  out = {}
  for name in ("dropped_fraction", "experts_per_token"):
    vals = [
      float(v) for k, v in metrics.items() if k.startswith("router/") and k.endswith("/" + name)
    ]
    if vals:
      out[f"mean_{name}"] = float(np.mean(vals))
  loads = [np.asarray(v) for k, v in metrics.items() if k.endswith("/expert_load")]
  if loads:
    out["max_expert_load"] = float(max(np.max(l) for l in loads))
  return out
