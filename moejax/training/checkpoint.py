"""Orbax checkpoints of the train state and the input position, verified on restore.

Each checkpoint step holds two Orbax items:
  state: the TrainState pytree (``StandardSave``; sharded arrays, each host writes its
         own shards, restored straight into the target shardings),
  meta:  JSON with the per-host data-iterator states and a checksum of every state leaf.

On restore the checksums are recomputed; a checkpoint that fails to load or verify is
reported and the next older one is tried, so a torn or corrupted save never becomes the
resumed state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moejax.training.paths import as_path

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError, ValueError):
  """No usable checkpoint could be restored (a ValueError too: tools report it in one line)."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Position-weighted wrap-around sum of a leaf's raw bits: u32[].

  sum_i bits_i * (2654435761 * i + 1) mod 2^32 — changes if any bit flips or two
  elements swap; reduces fine over sharded arrays.
  """
  width = jnp.dtype(x.dtype).itemsize * 8
  if width not in (8, 16, 32):
    x = x.astype(jnp.float32)
    width = 32
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
  position = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  return jnp.sum(bits * (position * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _tree_checksums(tree) -> list:
  return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def tree_checksums(tree) -> dict[str, int]:
  """{'params/layers_0/...': checksum} for every array leaf of `tree`."""
  paths = [
    jax.tree_util.keystr(p, simple=True, separator="/")
    for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  values = jax.device_get(_tree_checksums(tree))
  return {path: int(v) for path, v in zip(paths, values)}


def gather_host_states(local_state: dict) -> dict[str, Any]:
  """All hosts' JSON-able iterator states as {'0': state_of_host_0, ...} on every host."""
  if jax.process_count() == 1:
    return {"0": local_state}
  encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: encoded.size] = encoded
  everyone = multihost_utils.process_allgather(padded)
  return {
    str(i): json.loads(bytes(everyone[i][: int(lengths[i][0])]).decode())
    for i in range(jax.process_count())
  }


class Checkpointer:
  """Keep-N, optionally asynchronous Orbax checkpointing with verified restore."""

  def __init__(self, directory, keep: int, async_save: bool = True):
    directory = as_path(directory)  # a local folder or an object-store URI, never abspath'd
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    self.directory = directory

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves `state` and this host's `data_state` at `step` (asynchronously if enabled)."""
    self.save_all_hosts(step, state, gather_host_states(data_state))

  def save_all_hosts(self, step: int, state, host_data_states: dict[str, Any]) -> None:
    """Saves `state` with every host's data state ({'0': ..., '1': ...})."""
    meta = {"step": int(step), "data": host_data_states, "checksums": tree_checksums(state)}
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores step `step` into `abstract_state`'s shardings and verifies its checksums.

    Returns (state, meta) with meta = {'step', 'data': per-host states, 'checksums'}.
    """
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    state, meta = restored["state"], restored["meta"]
    bad = _mismatched_leaves(meta["checksums"], tree_checksums(state))
    if bad:
      raise CheckpointError(f"checksum mismatch in {len(bad)} tensor(s), e.g. {bad[:3]}")
    return state, meta

  def restore_verified(self, step: int, abstract_state) -> tuple[Any, dict]:
    """``restore``, any failure a one-paragraph CheckpointError naming the step directory."""
    try:
      return self.restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001 — any failure to load means "not usable"
      raise CheckpointError(
        f"checkpoint {self.directory / str(step)} is unusable: {_first_line(e)}"
      ) from e

  def restore_newest(self, abstract_state, quarantine: bool = True) -> tuple[Any, dict, int]:
    """(state, meta, step) of the newest checkpoint that loads and verifies; newer unusable
    steps are logged and (if `quarantine`) moved aside. CheckpointError if none is usable."""
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state, meta = self.restore_verified(step, abstract_state)
      except CheckpointError as e:
        log.error("%s", e)
        failures.append(str(e))
        continue
      if failures:
        log.warning("Fell back to checkpoint step %d after: %s", step, "; ".join(failures))
        if quarantine:
          self._quarantine([s for s in steps if s > step])
      return state, meta, step
    raise CheckpointError("no usable checkpoint: " + "; ".join(failures))

  def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
    """Restores the newest checkpoint that loads and verifies; None when there is none.

    Returns (state, this host's data-iterator state, step). Raises CheckpointError when
    checkpoints exist but none is usable.
    """
    if not self.all_steps():
      return None
    state, meta, step = self.restore_newest(abstract_state)
    return state, meta["data"][str(jax.process_index())], step

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unusable newer steps to <dir>/../quarantine/ (kept for inspection), so the
    resumed run can save those step numbers again."""
    quarantine = self.directory.parent / "quarantine_checkpoints"
    if jax.process_index() == 0:
      quarantine.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = quarantine / f"{step}.{int(time.time())}"
        (self.directory / str(step)).rename(target)
        log.warning("Moved unusable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moejax_checkpoint_quarantine")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(error: Exception, limit: int = 300) -> str:
  """An exception as one short line (Orbax errors run to hundreds of lines)."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _mismatched_leaves(saved: dict[str, int], restored: dict[str, int]) -> list[str]:
  if saved.keys() != restored.keys():
    return sorted(set(saved) ^ set(restored))
  return [k for k in saved if saved[k] != restored[k]]
