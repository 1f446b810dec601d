"""Metrics sinks: ``metrics.jsonl`` and TensorBoard events in the workdir (local or an
object-store URI), and a one-line console summary.

Only the primary process (index 0) writes; other hosts get a no-op writer.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from moejax.training.paths import as_path, is_uri, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def to_jsonable(value: Any) -> Any:
  """Arrays -> floats or lists; non-finite floats -> 'nan'/'inf' strings (valid JSON)."""
  value = np.asarray(value)
  if value.ndim == 0:
    v = float(value)
    return v if math.isfinite(v) else str(v)
  return [to_jsonable(v) for v in value]


class MetricsWriter:
  """Writes one JSON object per record to ``<workdir>/metrics.jsonl`` (each stamped with
  the writer's `run_id`) and, if `tensorboard`, the scalars as TensorBoard event files in
  the workdir (tensorboardX). Local files are appended to; on an object store (no append)
  the whole object is rewritten at most every `flush_secs` and on ``close``."""

  def __init__(
    self,
    workdir,
    enabled: bool = True,
    run_id: str | None = None,
    tensorboard: bool = False,
    flush_secs: float = 30.0,
  ):
    self.enabled = enabled
    self.run_id = run_id
    self.workdir = as_path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.remote = is_uri(self.workdir)
    self.flush_secs = flush_secs
    self._lines: list[str] = []  # object stores: the whole file, rewritten on flush
    self._dirty = False
    self._last_flush = time.monotonic()
    self._tb = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self.remote and self.path.exists():
      self._lines = self.path.read_text().splitlines(keepends=True)
    if tensorboard:
      self._tb = _tensorboard_writer(self.workdir)

  def truncate_after(self, step: int) -> int:
    """Drops the records of steps > `step` (replayed after a resume) and torn lines;
    returns how many lines were dropped."""
    if not self.enabled or not self.path.exists():
      return 0
    lines = self._lines if self.remote else self.path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if int(record.get("step", 0)) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped:
      if self.remote:
        self._lines, self._dirty = kept, True
        self.flush()
      else:
        write_text_atomic(self.path, "".join(kept))
    return dropped

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    if self.run_id is not None:
      record = dict(record, run_id=self.run_id)
    line = json.dumps({k: v if isinstance(v, str) else to_jsonable(v) for k, v in record.items()})
    if self.remote:
      self._lines.append(line + "\n")
      self._dirty = True
      if time.monotonic() - self._last_flush >= self.flush_secs:
        self.flush()
    else:
      with self.path.open("a") as f:
        f.write(line + "\n")
    if self._tb is not None and "step" in record:
      try:
        for key, value in record.items():
          if key != "step" and not isinstance(value, str) and np.ndim(value) == 0:
            self._tb.add_scalar(key, float(value), int(record["step"]))
      except Exception as e:  # noqa: BLE001 — TensorBoard is optional output
        logging.getLogger(__name__).warning("TensorBoard events off: %s", e)
        self._tb = None

  def flush(self) -> None:
    if self.enabled and self.remote and self._dirty:
      self.path.write_text("".join(self._lines))
      self._dirty = False
    self._last_flush = time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _tensorboard_writer(workdir):
  """A tensorboardX writer with its event files in `workdir`; None (with a warning) where
  tensorboardX cannot write there."""
  try:
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(workdir), flush_secs=30)
  except Exception as e:  # noqa: BLE001 — TensorBoard is optional output
    logging.getLogger(__name__).warning("No TensorBoard events in %s: %s", workdir, e)
    return None


def summarize(metrics: dict, keys: tuple[str, ...]) -> str:
  """'loss=2.31 ce_loss=2.29 ...' for the scalar `keys` present in `metrics`."""
  parts = []
  for key in keys:
    if key in metrics and np.ndim(metrics[key]) == 0:
      parts.append(f"{key.split('/')[-1]}={float(metrics[key]):.4g}")
  return " ".join(parts)


def router_summary(metrics: dict) -> dict[str, float]:
  """Mean over MoE layers of dropped fraction / experts per token, and the largest and
  smallest expert load share over all layers."""
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
    out["min_expert_load"] = float(min(np.min(l) for l in loads))
  return out
