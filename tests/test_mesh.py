"""The ('data', 'expert', 'model') mesh, its config errors, and the logical-axis rules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config import ExperimentConfig, MeshConfig, base_config
from moejax.errors import ConfigError
from moejax.layers import DenseFFN
from moejax.layers.moe import MoELayer
from moejax.moe_config import MoEConfig
from moejax.parallel import (
  MESH_AXES,
  TOKEN_AXES,
  batch_sharding,
  logical_axis_rules,
  logical_to_sharding,
  make_mesh,
  mesh_shape_of,
  params_shardings,
  resolve_mesh_shape,
  shard_params,
  validate_mesh_for_moe,
)


def shape_of(mesh) -> tuple[int, int, int]:
  return tuple(mesh.shape[a] for a in MESH_AXES)


def test_axes_constants():
  assert MESH_AXES == ("data", "expert", "model")
  assert TOKEN_AXES == ("data", "expert")


@pytest.mark.parametrize(
  "cfg, want",
  [
    ({"data": 2, "expert": 4, "model": 1}, (2, 4, 1)),
    ({"data": 1, "expert": 8, "model": 1}, (1, 8, 1)),
    ({"data": -1, "expert": 2, "model": 2}, (2, 2, 2)),
    ({"data": 1, "expert": -1, "model": 2}, (1, 4, 2)),
    ({"data": 8, "expert": 1, "model": -1}, (8, 1, 1)),
  ],
)
def test_make_mesh_shapes_and_fill(cfg, want):
  mesh = make_mesh(cfg)
  assert mesh.axis_names == MESH_AXES
  assert shape_of(mesh) == want
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_from_config_dict_and_device_subset():
  cfg = ml_collections.ConfigDict({"data": 1, "expert": -1, "model": 1})
  mesh = make_mesh(cfg, devices=jax.devices()[:2])
  assert shape_of(mesh) == (1, 2, 1)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[:2]}
  one = make_mesh({"data": 1, "expert": 1, "model": 1}, devices=jax.devices()[:1])
  assert one.devices.size == 1


@pytest.mark.parametrize(
  "cfg, pattern",
  [
    ({"data": 2, "expert": 2, "model": 1}, r"^mesh\.data=2 is invalid: .* = 4 must equal .* \(8\)"),
    ({"data": 16, "expert": 1, "model": 1}, r"^mesh\.data=16 is invalid"),
    ({"data": 2, "expert": 3, "model": 1}, r"^mesh\.expert=3 is invalid"),
    ({"data": 3, "expert": -1, "model": 1}, r"^mesh\.data=3 is invalid: .*mesh\.expert=-1"),
    ({"data": 1, "expert": 3, "model": -1}, r"^mesh\.expert=3 is invalid"),
    ({"data": -1, "expert": -1, "model": 1}, r"^mesh\.expert=-1 is invalid: only one"),
    ({"data": 0, "expert": 8, "model": 1}, r"^mesh\.data=0 is invalid: must be an int"),
    ({"data": 2.0, "expert": 4, "model": 1}, r"^mesh\.data=2\.0 is invalid"),
    ({"data": True, "expert": 8, "model": 1}, r"^mesh\.data=True is invalid"),
    ({"data": 1, "expert": "8", "model": 1}, r"^mesh\.expert='8' is invalid"),
    ({"data": 1, "expert": 8, "model": 1, "pipe": 1}, r"^mesh\.pipe=1 is invalid: unknown"),
    ({"data": 2, "expert": 4}, r"^mesh\.model is missing"),
  ],
)
def test_mesh_config_errors_name_the_field(cfg, pattern):
  with pytest.raises(ConfigError, match=pattern):
    make_mesh(cfg)


def test_resolve_mesh_shape_custom_path():
  sizes = MeshConfig.from_config({"data": -1, "expert": 4, "model": 1})
  assert resolve_mesh_shape(sizes, 16) == {"data": 4, "expert": 4, "model": 1}
  run_mesh = MeshConfig.from_config({"data": 1, "expert": 5, "model": -1}, path="run.mesh")
  with pytest.raises(ConfigError, match=r"^run\.mesh\.expert=5 is invalid"):
    resolve_mesh_shape(run_mesh, 8)
  with pytest.raises(ConfigError, match=r"^run\.mesh\.expert=5 is invalid"):
    make_mesh(run_mesh)  # the MeshConfig's own path, not make_mesh's default
  with pytest.raises(TypeError, match="MeshConfig"):
    resolve_mesh_shape({"data": -1, "expert": 4, "model": 1}, 16)  # parsed at the edge only


def test_mesh_is_validated_once_per_experiment(monkeypatch):
  """ExperimentConfig.from_config validates the mesh; make_mesh uses that MeshConfig as is."""
  cfg = base_config()
  cfg.mesh.expert, cfg.mesh.model = 2, 2
  checks = []
  post_init = MeshConfig.__post_init__
  monkeypatch.setattr(MeshConfig, "__post_init__", lambda self: checks.append(post_init(self)))
  exp = ExperimentConfig.from_config(cfg)
  assert len(checks) == 1
  assert shape_of(make_mesh(exp.mesh)) == (2, 2, 2)
  assert len(checks) == 1


def test_mesh_shape_of():
  assert mesh_shape_of(make_mesh({"data": 2, "expert": -1, "model": 2})) == {
    "data": 2,
    "expert": 2,
    "model": 2,
  }
  assert mesh_shape_of({"expert": 4}) == {"data": 1, "expert": 4, "model": 1}


def test_validate_mesh_for_moe():
  mesh = make_mesh({"data": 1, "expert": 4, "model": 2})
  validate_mesh_for_moe(mesh, MoEConfig(num_experts=8, expert_d_ff=32))
  validate_mesh_for_moe(mesh, None)  # dense model
  validate_mesh_for_moe({"expert": 16}, {"num_experts": 32, "expert_d_ff": 7})
  cfg = MoEConfig(num_experts=6, expert_d_ff=32, config_path="model.moe")
  with pytest.raises(
    ConfigError,
    match=r"^model\.moe\.num_experts=6 is invalid: .*"
    r"mesh\.expert=4",
  ):
    validate_mesh_for_moe(mesh, cfg)
  with pytest.raises(
    ConfigError,
    match=r"^model\.moe\.expert_d_ff=33 is invalid: .*"
    r"mesh\.model=2",
  ):
    validate_mesh_for_moe(mesh, {"num_experts": 8, "expert_d_ff": 33})


def test_rules_map_logical_names_to_mesh_axes():
  rules = dict(logical_axis_rules())
  assert rules["batch"] == TOKEN_AXES and rules["expert"] == "expert"
  mesh = make_mesh({"data": 2, "expert": 2, "model": 2})
  specs = {
    "expert_in": P("expert", "embed", "expert_mlp"),
    "expert_out": P("expert", "expert_mlp", "embed"),
    "router": P("embed", "router"),
    "dense_in": P("embed", "mlp"),
    "batch": P("batch", "length"),
    "unknown": P("nothing_maps_this", "embed"),
  }
  got = logical_to_sharding(specs, mesh)
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in got.values())
  want = {
    "expert_in": P("expert", None, "model"),
    "expert_out": P("expert", "model", None),
    "router": P(None, None),
    "dense_in": P(None, "model"),
    "batch": P(("data", "expert"), None),
    "unknown": P(None, None),
  }
  for k, spec in want.items():
    assert got[k].spec == spec, k
  assert batch_sharding(mesh).spec == P(("data", "expert"), None)


def test_indivisible_dims_replicated_except_expert_dims():
  mesh = make_mesh({"data": 1, "expert": 4, "model": 2})
  got = logical_to_sharding({"vocab": P("vocab", "embed")}, mesh, shapes={"vocab": (259, 16)})
  assert got["vocab"].spec == P(None, None)
  with pytest.raises(ValueError, match=r"'expert'.*size 6"):
    logical_to_sharding(P("expert", "embed", "expert_mlp"), mesh, shapes=(6, 16, 32))
  with pytest.raises(ValueError, match=r"'expert_mlp'.*size 33"):
    logical_to_sharding(P("expert", "embed", "expert_mlp"), mesh, shapes=(8, 16, 33))


def _moe_boxed_params():
  cfg = MoEConfig(
    num_experts=8, expert_d_ff=32, router="shared_experts", num_shared_experts=2, group_size=8
  )
  return jax.jit(MoELayer(cfg).init)(jax.random.key(0), jnp.ones((2, 8, 16), jnp.float32))["params"]


def test_shard_params_places_leaves_by_logical_names():
  mesh = make_mesh({"data": 2, "expert": 2, "model": 2})
  boxed = _moe_boxed_params()
  placed = shard_params(boxed, mesh)
  assert isinstance(placed["wi_gate"], nn.Partitioned)  # boxed in, boxed out
  values = nn.meta.unbox(placed)
  assert values["wi_gate"].sharding.spec == P("expert", None, "model")
  assert values["wi_gate"].sharding.shard_shape((8, 16, 32)) == (4, 16, 16)
  assert values["wo"].sharding.shard_shape((8, 32, 16)) == (4, 16, 16)
  assert values["router"].sharding.is_fully_replicated
  assert values["shared"]["wo"].sharding.spec == P("model", None)
  # Placement moves values, never changes them.
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    values,
    nn.meta.unbox(boxed),
  )
  # Each device holds exactly its block of the expert axis.
  for shard in values["wi_up"].addressable_shards:
    np.testing.assert_array_equal(
      np.asarray(shard.data), np.asarray(nn.meta.unbox(boxed)["wi_up"])[shard.index]
    )


def test_shard_params_unboxed_needs_logical_specs():
  mesh = make_mesh({"data": 1, "expert": 8, "model": 1})
  boxed = _moe_boxed_params()
  values = nn.meta.unbox(boxed)
  placed = shard_params(values, mesh, logical_specs=boxed)
  assert placed["wi_gate"].sharding.shard_shape((8, 16, 32)) == (1, 16, 32)
  placed2 = shard_params(values, mesh, logical_specs=nn.get_partition_spec(boxed))
  assert placed2["wo"].sharding.spec == placed["wo"].sharding.spec == P("expert", "model", None)
  with pytest.raises(ValueError, match="logical_specs"):
    shard_params(values, mesh)


def test_params_shardings_of_abstract_tree():
  mesh = make_mesh({"data": 4, "expert": 1, "model": 2})
  abstract = jax.eval_shape(DenseFFN(64).init, jax.random.key(0), jnp.ones((2, 4, 16)))
  shardings = params_shardings(abstract["params"], mesh)
  assert shardings["wi_gate"].spec == P(None, "model")
  assert shardings["wo"].spec == P("model", None)
