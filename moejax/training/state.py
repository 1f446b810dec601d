"""The train state and its placement on the mesh (pjit style).

Parameters carry logical axis names (``nn.with_logical_partitioning``); the same names
are found again on the optimizer moments because optax maps over the boxed tree, so one
``nn.get_partition_spec`` call yields the logical spec of the whole state, and the
logical-axis rules turn it into ``NamedSharding``s for ``jax.jit``'s in/out shardings.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moejax.models import Transformer
from moejax.parallel.rules import params_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]: number of optimizer updates applied
  params: Any  # unboxed parameter pytree
  opt_state: Any  # optax state mirroring params


def _boxed_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  """init(rng) -> TrainState whose params/opt_state still carry nn.Partitioned boxes."""

  def init(rng: jax.Array) -> TrainState:
    # Enough rows that the MoE layers' routing groups tile the init batch exactly.
    moe = getattr(getattr(model, "cfg", None), "moe", None)
    group = getattr(moe, "group_size", None) or seq_len
    tokens = jnp.zeros((group // math.gcd(group, seq_len), seq_len), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def state_shardings(
  model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: jax.sharding.Mesh, rules
) -> tuple[Any, TrainState]:
  """Returns (NamedSharding tree, abstract unboxed TrainState) without allocating."""
  abstract_boxed = jax.eval_shape(_boxed_init_fn(model, tx, seq_len), jax.random.key(0))
  # Dims the mesh does not divide (e.g. a 259-row byte vocab on model=2) are replicated.
  shardings = params_shardings(abstract_boxed, mesh, rules)
  abstract = nn.meta.unbox(abstract_boxed)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return shardings, abstract


def create_train_state(
  model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int, shardings
) -> TrainState:
  """Initialises params and optimizer state directly in their sharded layout."""
  init = _boxed_init_fn(model, tx, seq_len)
  init_unboxed = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)
  return init_unboxed(jax.random.key(seed))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def abstract_params(model_cfg) -> Any:
  """The unboxed parameter tree of ``Transformer(model_cfg)`` as ShapeDtypeStructs (nothing
  is allocated)."""
  boxed = jax.eval_shape(
    lambda: Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  )
  return nn.meta.unbox(boxed["params"])
