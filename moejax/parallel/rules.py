"""Logical-axis rules: from the logical names on params/activations to mesh axes.

``LOGICAL_AXIS_RULES`` (MaxText/flaxformer style: first applicable rule wins, each mesh
axis at most once per array, no rule = replicated) turn the names given by
``nn.with_logical_partitioning`` into PartitionSpecs, e.g. an expert kernel ('expert',
'embed', 'expert_mlp') [E, d, f] -> P('expert', None, 'model'). FSDP (ZeRO-3; Rajbhandari
et al., 2020) also splits 'embed' over ('data', 'expert'), or 'data' where 'expert' is taken.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel.mesh import TOKEN_AXES

log = logging.getLogger(__name__)

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # activations
  ("batch", TOKEN_AXES),
  ("length", None),
  ("activation_embed", None),
  # parameters
  ("embed", None),
  ("mlp", "model"),
  ("expert", "expert"),
  ("expert_mlp", "model"),
  ("router", None),
  ("vocab", "model"),
  ("heads", "model"),
  ("kv_heads", "model"),
  ("head_dim", None),
  ("q_lora", None),  # MLA latent widths: small, replicated
  ("kv_lora", None),
  ("layers", None),
)

# FSDP: the same table with 'embed' split over the token axes (falling back to 'data').
FSDP_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = tuple(
  r for r in LOGICAL_AXIS_RULES if r[0] != "embed"
) + (
  ("embed", TOKEN_AXES),
  ("embed", "data"),
)

# Logical axes consumed by the expert-parallel shard_map with fixed in_specs: replicating
# them as a fallback would not match those specs, so a non-divisible size is an error
# (``validate_mesh_for_moe`` reports it as a config error earlier).
STRICT_LOGICAL_AXES: frozenset[str] = frozenset({"expert", "expert_mlp"})


def logical_axis_rules(fsdp: bool = False) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The project's rules, a tuple of (logical name, mesh axis | tuple of axes | None);
  ``fsdp=True`` adds the FSDP placement of parameters (module docstring)."""
  return FSDP_LOGICAL_AXIS_RULES if fsdp else LOGICAL_AXIS_RULES


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _fit_to_shape(logical: P, mesh_spec: P, shape: Sequence[int], mesh: Mesh, where: str) -> P:
  """Replicates dims whose size the mesh axes do not divide (only for non-strict names).

  Replicating a dim is always numerically safe under jit (GSPMD) -- it only costs memory
  -- whereas an uneven split cannot be expressed as a jit in/out sharding at all.
  """
  entries = list(mesh_spec) + [None] * (len(shape) - len(mesh_spec))
  names = list(logical) + [None] * (len(shape) - len(logical))
  for i, (size, axes) in enumerate(zip(shape, entries)):
    n = _axis_size(mesh, axes)
    if n > 1 and size % n:
      if names[i] in STRICT_LOGICAL_AXES:
        raise ValueError(
          f"{where}: dim {i} ('{names[i]}') has size {size}, not divisible "
          f"by mesh axes {axes} of size {n}; the expert-parallel layer needs "
          f"an even split (check moe.num_experts / moe.expert_d_ff)"
        )
      log.info(
        "%s: dim %d ('%s') of size %d is not divisible by mesh axes %s (%d); "
        "replicating it instead",
        where,
        i,
        names[i],
        size,
        axes,
        n,
      )
      entries[i] = None
  return P(*entries)


def logical_to_sharding(
  logical_spec_tree: Any, mesh: Mesh, rules: LogicalRules | None = None, shapes: Any = None
) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedSharding on `mesh`.

  Args:
    logical_spec_tree: PartitionSpecs of logical names, e.g. P('batch', 'length').
    rules: logical-axis rules (default ``logical_axis_rules()``).
    shapes: optional matching tree of shapes / arrays / ShapeDtypeStructs. When given, a
      dim whose size is not divisible by its mesh axes is replicated instead (logged),
      e.g. a byte vocab of 259 rows on model=2; 'expert'/'expert_mlp' dims raise instead.
  """
  rules = logical_axis_rules() if rules is None else rules
  if shapes is None:
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)
  mesh_specs = nn.logical_to_mesh(logical_spec_tree, rules)
  flat_logical, treedef = jax.tree_util.tree_flatten_with_path(logical_spec_tree, is_leaf=_is_spec)
  flat_mesh = treedef.flatten_up_to(mesh_specs)
  flat_shapes = treedef.flatten_up_to(shapes)
  out = []
  for (path, logical), mesh_spec, shape in zip(flat_logical, flat_mesh, flat_shapes):
    shape = tuple(getattr(shape, "shape", shape))
    where = jax.tree_util.keystr(path) or "<root>"
    out.append(NamedSharding(mesh, _fit_to_shape(logical, mesh_spec, shape, mesh, where)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _has_boxes(tree: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return any(isinstance(x, nn.Partitioned) for x in leaves)


def params_shardings(
  abstract_boxed_params: Any, mesh: Mesh, rules: LogicalRules | None = None
) -> Any:
  """NamedSharding for every leaf of a boxed (``nn.Partitioned``) params tree.

  Works on any boxed tree (params, a whole TrainState with optimizer moments) of arrays or
  ShapeDtypeStructs, e.g. ``jax.eval_shape(model.init, rng, x)['params']``. Leaves
  without logical names are replicated. The result is shaped like the *unboxed* tree.
  Dims not divisible by their mesh axes are replicated (see ``logical_to_sharding``), so
  e.g. a 259-row byte-vocab embedding stays whole on model=2 while everything else is
  split; expert dims must divide evenly and raise otherwise.
  """
  logical = nn.get_partition_spec(abstract_boxed_params)
  shapes = nn.meta.unbox(abstract_boxed_params)
  return logical_to_sharding(logical, mesh, rules, shapes)


def shard_params(
  params: Any, mesh: Mesh, rules: LogicalRules | None = None, logical_specs: Any = None
) -> Any:
  """Places a params tree on `mesh` according to its logical axis names.

  Args:
    params: a boxed tree (``nn.Partitioned`` leaves, as returned by ``model.init``) -- its
      own names are used and a boxed tree with placed values is returned -- or an unboxed
      tree, in which case `logical_specs` must give the names: a boxed tree of the same
      structure (e.g. ``jax.eval_shape(model.init, ...)``) or a tree of logical
      PartitionSpecs. An unboxed tree is returned.
  """
  if _has_boxes(params):
    shardings = params_shardings(params, mesh, rules)
    values = jax.device_put(nn.meta.unbox(params), shardings)
    return nn.meta.replace_boxed(params, values)
  if logical_specs is None:
    raise ValueError(
      "shard_params got an unboxed params tree without logical_specs; pass "
      "the boxed tree from model.init / jax.eval_shape(model.init, ...) or "
      "its nn.get_partition_spec(...) as logical_specs"
    )
  if _has_boxes(logical_specs):
    logical_specs = nn.get_partition_spec(logical_specs)
  shardings = logical_to_sharding(logical_specs, mesh, rules, params)
  return jax.device_put(params, shardings)


def batch_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> NamedSharding:
  """Sharding of [B, L] token batches: rows over ('data', 'expert'), length replicated."""
  return logical_to_sharding(P("batch", "length"), mesh, rules)
