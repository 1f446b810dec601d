"""Device mesh and logical-axis sharding rules (below the layers; the expert-parallel
MoE layer is ``moejax.layers.expert_parallel``).

  mesh.py             the ('data', 'expert', 'model') mesh and its validation
  rules.py            logical axis names -> PartitionSpecs / NamedShardings
"""

from moejax.parallel.mesh import (
  MESH_AXES,
  TOKEN_AXES,
  make_mesh,
  mesh_shape_of,
  resolve_mesh_shape,
  validate_mesh_for_moe,
)
from moejax.parallel.rules import (
  batch_sharding,
  logical_axis_rules,
  logical_to_sharding,
  params_shardings,
  shard_params,
)
