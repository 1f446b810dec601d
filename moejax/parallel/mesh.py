"""The device mesh ('data', 'expert', 'model') and its validation against a config.

Axes:
  data:   data parallelism (tokens split; weights replicated, or split as well with
          ``train.fsdp``: FSDP / ZeRO-3, see ``moejax.parallel.rules``).
  expert: expert parallelism; tokens are split over it too (batch = data x expert), and
          the leading E axis of the stacked expert weights is split over it, so slot
          buffers travel between its devices with ``all_to_all``.
  model:  tensor parallelism of FFN hidden widths / heads / vocab (Megatron style).

Everything here is validated in plain Python before anything is traced or compiled, and
errors are ``moejax.errors.ConfigError`` naming the offending field (``mesh.expert``,
``model.moe.num_experts``, ...).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moejax.config import MeshConfig
from moejax.errors import config_error

MESH_AXES: tuple[str, str, str] = ("data", "expert", "model")
# Axes that split tokens (groups / batch rows); expert parallelism reuses the expert axis.
TOKEN_AXES: tuple[str, str] = ("data", "expert")


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Fills a single -1 axis of the validated `mesh_cfg` with the remaining devices.

  `mesh_cfg` is the ``MeshConfig`` parsed once at the edge (``ExperimentConfig.from_config``
  or ``MeshConfig.from_config``: ints >= 1 or -1, at most one -1); nothing is re-parsed here.
  data * expert * model must equal `num_devices` exactly (the -1 axis gets
  num_devices / product(others), which must be an integer). Returns {'data': int,
  'expert': int, 'model': int}. Raises ConfigError naming ``<mesh_cfg.config_path>.<axis>``.
  """
  if not isinstance(mesh_cfg, MeshConfig):
    raise TypeError(
      f"resolve_mesh_shape takes a MeshConfig (parse it with MeshConfig.from_config), "
      f"got {type(mesh_cfg).__name__}"
    )
  path = mesh_cfg.config_path
  sizes = mesh_cfg.sizes()
  fill = next((name for name, v in sizes.items() if v == -1), None)
  fixed = math.prod(v for v in sizes.values() if v != -1)
  product = "*".join(MESH_AXES) + " = " + "*".join(str(sizes[a]) for a in MESH_AXES)
  if fill is not None:
    if num_devices % fixed:
      culprit = _first_non_divisor(sizes, num_devices, skip=fill) or fill
      raise config_error(
        f"{path}.{culprit}",
        sizes[culprit],
        f"the other axes ({product}) must divide the {num_devices} devices "
        f"so that {path}.{fill}=-1 can take the rest",
      )
    sizes[fill] = num_devices // fixed
    return sizes
  if fixed != num_devices:
    culprit = _first_non_divisor(sizes, num_devices) or "data"
    raise config_error(
      f"{path}.{culprit}",
      sizes[culprit],
      f"{product} = {fixed} must equal the number of devices "
      f"({num_devices}); set one axis to -1 to fill the remaining devices",
    )
  return sizes


def _first_non_divisor(sizes: dict[str, int], n: int, skip: str | None = None) -> str | None:
  """The first axis (in MESH_AXES order) at which the running product stops dividing n."""
  running = 1
  for name in MESH_AXES:
    if name == skip:
      continue
    running *= sizes[name]
    if n % running:
      return name
  return None


def make_mesh(
  mesh_cfg: MeshConfig | Mapping[str, int],
  devices: Sequence[jax.Device] | None = None,
  path: str = "mesh",
) -> Mesh:
  """Builds the ('data', 'expert', 'model') mesh from a config with int fields of those names.

  Args:
    mesh_cfg: the validated ``MeshConfig`` (what the trainer and tools pass:
      ``ExperimentConfig.mesh``, used as is), or a mapping {'data', 'expert', 'model'}
      parsed here with ``MeshConfig.from_config`` (tests, direct library use); at most one
      size may be -1 (= all remaining devices).
    devices: the devices to span (default ``jax.devices()``, i.e. all processes' devices).
    path: dotted config path of a mapping, used in error messages.
  Returns:
    A Mesh whose axes are all ``AxisType.Auto``. ``jax.make_mesh`` defaults to
    ``AxisType.Explicit`` in jax >= 0.7 (sharding in types); the layers here rely on the
    GSPMD behaviour of Auto axes (``with_sharding_constraint``, Flax logical partitioning)
    plus an explicit ``jax.shard_map`` for the expert exchange.
  Raises:
    ConfigError naming the field, before anything is compiled.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(mesh_cfg, MeshConfig):
    mesh_cfg = MeshConfig.from_config(mesh_cfg, path)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    # Topology-aware device order (rings on TPU); the shape is already validated.
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # create_device_mesh rejects some device subsets (e.g. part of a TPU slice); a plain
    # row-major layout of the given devices is always a valid, if less tuned, mesh.
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_shape_of(mesh_or_shape: Mesh | Mapping[str, int]) -> dict[str, int]:
  """{'data': n, 'expert': n, 'model': n} from a Mesh or a mapping (missing axes = 1)."""
  shape = mesh_or_shape.shape if isinstance(mesh_or_shape, Mesh) else mesh_or_shape
  shape = dict(shape.items()) if hasattr(shape, "items") else dict(shape)
  return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def validate_mesh_for_moe(
  mesh_shape: Mesh | Mapping[str, int], moe_cfg: Any, mesh_path: str = "mesh"
) -> None:
  """Checks that the expert weights split evenly over the mesh.

  num_experts % mesh.expert == 0 (the leading E axis is split over 'expert') and
  expert_d_ff % mesh.model == 0 (the expert hidden dim is split over 'model').

  Args:
    mesh_shape: a Mesh or a mapping of resolved axis sizes.
    moe_cfg: a MoEConfig (its ``config_path`` names the fields) or a mapping with
      'num_experts' and 'expert_d_ff'; None (a dense model) passes.
  Raises:
    ConfigError naming the MoE field and the mesh axis.
  """
  if moe_cfg is None:
    return
  shape = mesh_shape_of(mesh_shape)
  path = getattr(moe_cfg, "config_path", "model.moe")
  for field, axis in (("num_experts", "expert"), ("expert_d_ff", "model")):
    value = moe_cfg[field] if isinstance(moe_cfg, Mapping) else getattr(moe_cfg, field)
    if value % shape[axis]:
      raise config_error(
        f"{path}.{field}",
        value,
        f"must be divisible by {mesh_path}.{axis}={shape[axis]} (the "
        f"'{axis}' mesh axis splits it evenly across devices)",
      )
