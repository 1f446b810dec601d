"""Expert parallelism: the MoE layer inside ``jax.shard_map`` with an ``all_to_all`` exchange.

Mesh ('data', 'expert', 'model') of sizes (D, P, M) (``moejax.parallel.mesh``). Routing
is per group of S tokens with capacity C per group (GShard), so splitting *whole groups*
over devices reproduces the unsharded math exactly; only the expert FFNs need other
devices' weights, and the slot buffers travel to them (GShard, Lepikhin et al., 2020;
Switch, Fedus et al., 2021, sec. 2.2 / fig. 9).

Placement (``shard_map`` in_specs / out_specs, ``T = ('data', 'expert')`` the token axes):

  groups         x [G, S, d]                P(T, None, None)   G_loc = G / (D * P) per device
  router kernel  [d, E + N]                 P()                replicated
  w_gate, w_up   [E, d, f]                  P('expert', None, 'model')  -> [E_loc, d, f_loc]
  w_down         [E, f, d]                  P('expert', 'model', None)  -> [E_loc, f_loc, d]
  y              [G, S, d]                  P(T, None, None)
  aux losses, metrics                       P()  (``pmean`` over T)

with E_loc = E / P experts and f_loc = f / M hidden units per device. Expert e lives on
expert-axis position e // E_loc (block layout, the order of the 'expert' weight shards).

Per device (every step is local except the three named collectives):

  logits = x @ router                    'gsd,dr->gsr'        [G_loc, S, E+N]  (f32)
  route -> dispatch_index, combine_weight, slot_valid           [G_loc, E, C]
  x_slots = gather(x, dispatch_index)                           [G_loc, E, C, d]
  reshape                                                       [G_loc, P_dst, E_loc, C, d]
  all_to_all over 'expert' (split P_dst, concat P_src)          [G_loc, P_src, E_loc, C, d]
    device p now holds, for each of its E_loc experts, the C slots of every group of
    every device on its expert row (G_loc * P groups' worth of slots per expert).
  h = act(x W_gate) * (x W_up)           'etd,edf->etf'       T = G_loc * P_src * C slots
  y_part = h W_down                      'etf,efd->etd'       partial sum over f_loc
  psum over 'model'                                             [G_loc, P_src, E_loc, C, d]
  all_to_all over 'expert' (back: split P_src, concat P_dst)    [G_loc, P_dst, E_loc, C, d]
  reshape, scatter-add with combine weights                     [G_loc, S, d]
  aux losses / metrics: pmean over ('data', 'expert') -- each is a mean over groups (or
  over tokens, equally many per device), so the mean of device means is the global value.

The 'model' devices of one (data, expert) position hold the same tokens and route them
identically (redundant, cheap); each computes its f_loc slice of every local expert, and
the down projection's partial sums are summed over 'model' (Megatron-style tensor
parallelism, Shoeybi et al., 2019). Null experts (AdaMoE) have no slots, so nothing is
sent for them. DeepSeekMoE shared experts are a dense FFN applied outside the exchange
(``moejax.layers.moe``), data-parallel with their 'mlp' width on 'model' via GSPMD.

Communication per device and layer, with X = G_loc * E * C * d slot elements
(E * C ~= capacity_factor * k * S for token choice, so X ~= cf * k * tokens_loc * d):

  forward   2 all_to_alls over P devices, each sending (P - 1) / P * X elements
            1 all-reduce over M devices of X elements (~2 (M - 1) / M * X sent, ring)
  backward  the same again (the transpose of all_to_all is an all_to_all; the input
            cotangent of the model-sharded FFN is all-reduced over 'model').

e.g. top-2 with cf = 1.25 on P = 8: each all_to_all sends ~2.2x the local activations.
With P = 1 the all_to_all is the identity and XLA may drop it.

The layer uses this module through ``MoELayer(cfg, mesh=mesh)``; it is plain
``moe_forward`` (the single-device function) with ``all_to_all_experts`` as its
``expert_fn``, run per device under ``jax.shard_map``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from moejax.errors import config_error
from moejax.layers.ffn import expert_ffn
from moejax.layers.moe import ExpertFn, moe_forward
from moejax.moe_config import MoEConfig
from moejax.parallel.mesh import MESH_AXES, TOKEN_AXES, validate_mesh_for_moe

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"

# shard_map specs of moe_forward's arguments / results (see the module docstring).
GROUP_SPEC = P(TOKEN_AXES, None, None)  # x, y [G, S, d]
ROUTER_SPEC = P()  # [d, E + N]
W_IN_SPEC = P(EXPERT_AXIS, None, MODEL_AXIS)  # w_gate, w_up [E, d, f]
W_OUT_SPEC = P(EXPERT_AXIS, MODEL_AXIS, None)  # w_down [E, f, d]


def all_to_all_experts(cfg: MoEConfig, axis: str = EXPERT_AXIS,
                       model_axis: str | None = MODEL_AXIS) -> ExpertFn:
  """An ``expert_fn`` for ``moe_forward`` that runs inside ``shard_map``.

  Sends every expert's slots to the device holding it over mesh axis `axis`, runs the
  local experts on this device's slice of their hidden width, sums the down-projection
  partial sums over `model_axis` (None: the hidden width is not split) and sends the
  outputs back.

  Returns:
    expert_fn(x_slots [G_loc, E, C, d], w_gate [E_loc, d, f_loc], w_up [E_loc, d, f_loc],
    w_down [E_loc, f_loc, d]) -> [G_loc, E, C, d], with E = E_loc * size(axis).
  """
  def expert_fn(x, w_gate, w_up, w_down):
    g, e, c, d = x.shape
    e_loc = w_gate.shape[0]
    ep = jax.lax.axis_size(axis)
    if e_loc * ep != e:
      raise ValueError(f"all_to_all_experts: {e} experts in the slot buffers but "
                       f"{e_loc} local experts x {ep} devices on mesh axis '{axis}'")
    x = x.reshape(g, ep, e_loc, c, d)  # [G, P_dst, E_loc, C, d]
    x = jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=1, tiled=True)  # P_src
    x = checkpoint_name(x, "moe_dispatch_a2a")
    # The local experts on the slots of G * P_src groups; partial sums over the f shards.
    y = expert_ffn(x.reshape(g * ep, e_loc, c, d), w_gate, w_up, w_down, cfg.activation)
    if model_axis is not None:
      y = jax.lax.psum(y, model_axis)
    y = y.reshape(g, ep, e_loc, c, d)
    y = jax.lax.all_to_all(y, axis, split_axis=1, concat_axis=1, tiled=True)  # P_dst
    y = checkpoint_name(y, "moe_combine_a2a")
    return y.reshape(g, e, c, d)

  return expert_fn


def num_token_shards(mesh: Mesh) -> int:
  """Devices the token groups are split over: mesh.data * mesh.expert."""
  return math.prod(mesh.shape[a] for a in TOKEN_AXES)


def check_expert_parallel(mesh: Mesh, cfg: MoEConfig, num_groups: int | None = None,
                          batch_shape: Sequence[int] | None = None,
                          mesh_path: str = "mesh") -> None:
  """Raises (before tracing) if the layer cannot be split evenly over `mesh`.

  Checks: the mesh has the axes ('data', 'expert', 'model'); num_experts % mesh.expert
  == 0 and expert_d_ff % mesh.model == 0 (ConfigError naming ``<moe path>.num_experts`` /
  ``.expert_d_ff``); the number of routing groups is divisible by mesh.data *
  mesh.expert (ConfigError naming ``<moe path>.group_size``, or
  ``data.global_batch_size`` when every sequence is one group).

  Args:
    num_groups: G, when known (``None`` skips that check).
    batch_shape: (B, L) of the layer input, for the error message.
  """
  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"the expert-parallel MoE layer needs a mesh with axes {MESH_AXES} "
                     f"(moejax.parallel.make_mesh); got axes {mesh.axis_names}")
  validate_mesh_for_moe(mesh, cfg, mesh_path)
  if num_groups is None:
    return
  shards = num_token_shards(mesh)
  if num_groups % shards:
    tokens = "x".join(str(n) for n in batch_shape) if batch_shape is not None else "?"
    per_sequence = " (one per sequence: group_size=None)" if cfg.group_size is None else ""
    allowed = (f"the {tokens} input tokens form {num_groups} routing groups{per_sequence}, "
               f"not divisible "
               f"by the {shards} token shards ({mesh_path}.data * {mesh_path}.expert = "
               f"{mesh.shape['data']} * {mesh.shape['expert']}); whole groups are split "
               f"over devices, so choose data.global_batch_size and "
               f"{cfg.config_path}.group_size so that batch * length / group_size is a "
               f"multiple of {shards}")
    if cfg.group_size is None:
      b = batch_shape[0] if batch_shape is not None else num_groups
      raise config_error("data.global_batch_size", b, allowed)
    raise config_error(f"{cfg.config_path}.group_size", cfg.group_size, allowed)


def expert_parallel_forward(x: jax.Array, router_kernel: jax.Array, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, cfg: MoEConfig, mesh: Mesh,
                            expert_fn: ExpertFn | None = None,
                            batch_shape: Sequence[int] | None = None):
  """``moe_forward`` with groups split over ('data', 'expert') and experts exchanged.

  Same arguments and results as ``moejax.layers.moe.moe_forward`` (x [G, S, d], all E
  experts' weights as global arrays; y [G, S, d], aux_losses, metrics), plus the `mesh`.
  Call it under ``jax.jit`` (GSPMD moves the arguments to the specs of the module
  docstring). `expert_fn` defaults to ``all_to_all_experts(cfg)``.
  """
  check_expert_parallel(mesh, cfg, x.shape[0], batch_shape)
  expert_fn = expert_fn or all_to_all_experts(cfg)

  def per_device(x, router_kernel, w_gate, w_up, w_down):
    y, aux_losses, metrics = moe_forward(x, router_kernel, w_gate, w_up, w_down, cfg,
                                         expert_fn)
    mean = lambda t: jax.tree.map(lambda v: jax.lax.pmean(v, TOKEN_AXES), t)
    return y, mean(aux_losses), mean(metrics)

  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(GROUP_SPEC, ROUTER_SPEC, W_IN_SPEC, W_IN_SPEC, W_OUT_SPEC),
      out_specs=(GROUP_SPEC, P(), P()))(x, router_kernel, w_gate, w_up, w_down)


__all__ = ["all_to_all_experts", "check_expert_parallel", "expert_parallel_forward",
           "num_token_shards"]
