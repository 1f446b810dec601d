"""Reshard a training checkpoint onto another mesh (e.g. another expert-parallel degree).

Orbax restores each array straight into the target ``NamedSharding``s computed for the
new mesh, so no host ever materialises the whole model; the result is written as a run
(same step, same per-host input positions, fresh checksums, config.json with the new
mesh) that ``moejax.train --workdir DST`` resumes.
"""

from __future__ import annotations

from moejax.config import ExperimentConfig
from moejax.training.checkpoint import Checkpointer
from moejax.training.paths import as_path
from moejax.training.workdir import restore_state, save_run_config


def with_mesh(config: ExperimentConfig, mesh_shape: dict[str, int]) -> ExperimentConfig:
  """`config` with the given mesh axis sizes."""
  return config.replace_fields({f"mesh.{axis}": int(n) for axis, n in mesh_shape.items()})


def reshard_checkpoint(
  config: ExperimentConfig, src: str, dst: str, mesh_shape: dict[str, int], step: int | None = None
) -> int:
  """Restores run `src` (newest step, or `step`) onto `mesh_shape` and writes run `dst`.

  Returns the step written. `config` is the run's config; only its mesh is changed.
  """
  new_config = with_mesh(config, mesh_shape)
  state, meta, step, _ = restore_state(new_config, src, step, unrolled=False)
  target = Checkpointer(as_path(dst) / "checkpoints", keep=1_000_000, async_save=False)
  if target.all_steps():
    target.close()
    raise FileExistsError(f"{dst} already holds checkpoints; choose a fresh output workdir")
  target.save_all_hosts(step, state, meta["data"])
  target.close()
  save_run_config(new_config, dst)
  return step
