"""Turns SIGTERM/SIGINT into a request to checkpoint and exit cleanly.

Preemptible TPU VMs and batch schedulers send SIGTERM before killing a job. The handler
only records the request; the train loop finishes the current step, saves a checkpoint
and exits 0. With several processes, every host must agree to stop at the same step, so
the flag is OR-reduced across processes.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager installing the handlers; ``should_stop()`` polls the request."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._requested = threading.Event()
    self._previous = {}
    self.signal_name: str | None = None

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    self.signal_name = signal.Signals(signum).name
    self._requested.set()

  def should_stop(self) -> bool:
    local = self._requested.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.any(flags))
