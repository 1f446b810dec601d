"""Device mesh, logical-axis sharding rules and expert parallelism.

  mesh.py             the ('data', 'expert', 'model') mesh and its validation
  rules.py            logical axis names -> PartitionSpecs / NamedShardings
  expert_parallel.py  the MoE layer under ``jax.shard_map`` with an all_to_all exchange
"""

from moejax.parallel.mesh import (MESH_AXES, TOKEN_AXES, make_mesh, mesh_shape_of,
                                  resolve_mesh_shape, validate_mesh_for_moe)
from moejax.parallel.rules import (batch_sharding, logical_axis_rules, logical_to_sharding,
                                   params_shardings, shard_params)
from moejax.parallel.expert_parallel import (all_to_all_experts, check_expert_parallel,
                                             expert_parallel_forward, num_token_shards)
