"""Expert parallelism: the MoE layer inside ``jax.shard_map`` with an ``all_to_all`` exchange.

Mesh ('data', 'expert', 'model') of sizes (D, P, M) (``moejax.parallel.mesh``). Routing
is per group of S tokens with capacity C per group (GShard), so splitting *whole groups*
over devices reproduces the unsharded math exactly; only the expert FFNs need other
devices' weights, and the slot buffers travel to them (GShard, Lepikhin et al., 2020;
Switch, Fedus et al., 2021, sec. 2.2 / fig. 9).

Placement (``shard_map`` in_specs / out_specs, ``T = ('data', 'expert')`` the token axes):

  groups         x [G, S, d]                P(T, None, None)   G_loc = G / (D * P) per device
  router kernel  [d, E + N]                 P()                replicated
  router bias    [E] (DeepSeek-V3) or None  P()                replicated
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

Dropless token choice (``cfg.sorted_dropless``) exchanges *rows*, not slots. Each device
has A = G_loc * S * K assignments; assignment (t, k) to expert e goes to expert-axis
position p = e // E_loc, ranked r among this device's assignments to p:

  send  [P_dst, R, d]    row r of block p = the token of the r-th assignment to p
  all_to_all over 'expert'                       -> [P_src, R, d] (+ local expert ids)
  grouped FFN of the received rows (``moejax.layers.grouped``), psum over 'model'
  all_to_all back                                -> [P_dst, R, d]; gather, weight, sum

R = min(A, max(ragged_buffer_min_rows, ceil(ragged_buffer_factor * A / P))) is the static
bound; with balanced routing each device sends ~A/P rows to each other, so the exchange
moves ~factor x the minimum bytes (A * d each way). Assignments ranked r >= R are dropped
and counted in the 'dropped_fraction' metric (never silently). On gpu/tpu
(ep_exchange='ragged_all_to_all') the same layout is filled by ``jax.lax.ragged_all_to_all``,
which moves only the routed rows (their sizes exchanged first with a small all_to_all).
THAT PATH IS UNTESTED: XLA:CPU rejects the op and no accelerator was available when it was
written; the tests exercise the padded CPU exchange, which fills the identical layout.

Checkpoint names: the dispatch all_to_all result is tagged 'moe_dispatch_a2a' and the
combine all_to_all result 'moe_combine_a2a' (``dispatch_a2a`` / ``combine_a2a`` below,
used by every exchange), so a remat policy can save or recompute them by name.

The layer uses this module through ``MoELayer(cfg, mesh=mesh)``: the single-device pieces
of ``moejax.layers.routed`` run per device under ``jax.shard_map`` with an exchange
around the expert FFNs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moejax.errors import config_error
from moejax.layers.ffn import expert_ffn
from moejax.layers.grouped import grouped_ffn, permute_rows, rank_in_group
from moejax.layers.routed import combine_assignments, router_logits, slot_experts
from moejax.moe_config import MoEConfig
from moejax.parallel.mesh import MESH_AXES, TOKEN_AXES, validate_mesh_for_moe
from moejax.routers import Routing, assignment_metrics, route

# expert_fn(x_slots [G, E, C, d], w_gate, w_up, w_down) -> [G, E, C, d]
ExpertFn = Callable[..., jax.Array]

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"

# shard_map specs of moe_forward's arguments / results (see the module docstring).
GROUP_SPEC = P(TOKEN_AXES, None, None)  # x, y [G, S, d]
ROUTER_SPEC = P()  # [d, E + N]
W_IN_SPEC = P(EXPERT_AXIS, None, MODEL_AXIS)  # w_gate, w_up [E, d, f]
W_OUT_SPEC = P(EXPERT_AXIS, MODEL_AXIS, None)  # w_down [E, f, d]


# ------------------------------------------------------------------------------------------
# The two exchanges. Every path produces its dispatch / combine all_to_all results here.
# ------------------------------------------------------------------------------------------


def dispatch_a2a(x: jax.Array, axis: str, split_axis: int) -> jax.Array:
  """all_to_all towards the experts (split `split_axis` by destination, concatenated by
  source), tagged 'moe_dispatch_a2a'."""
  y = jax.lax.all_to_all(x, axis, split_axis=split_axis, concat_axis=split_axis, tiled=True)
  return checkpoint_name(y, "moe_dispatch_a2a")


def combine_a2a(y: jax.Array, axis: str, split_axis: int) -> jax.Array:
  """all_to_all back from the experts, tagged 'moe_combine_a2a'."""
  x = jax.lax.all_to_all(y, axis, split_axis=split_axis, concat_axis=split_axis, tiled=True)
  return checkpoint_name(x, "moe_combine_a2a")


def all_to_all_experts(
  cfg: MoEConfig, axis: str = EXPERT_AXIS, model_axis: str | None = MODEL_AXIS
) -> ExpertFn:
  """A slot-buffer ``expert_fn`` (``moejax.layers.routed.slot_experts``) for ``shard_map``.

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
      raise ValueError(
        f"all_to_all_experts: {e} experts in the slot buffers but "
        f"{e_loc} local experts x {ep} devices on mesh axis '{axis}'"
      )
    x = x.reshape(g, ep, e_loc, c, d)  # [G, P_dst, E_loc, C, d]
    x = dispatch_a2a(x, axis, split_axis=1)  # [G, P_src, E_loc, C, d]
    # The local experts on the slots of G * P_src groups; partial sums over the f shards.
    y = expert_ffn(x.reshape(g * ep, e_loc, c, d), w_gate, w_up, w_down, cfg.activation)
    if model_axis is not None:
      y = jax.lax.psum(y, model_axis)
    y = y.reshape(g, ep, e_loc, c, d)
    y = combine_a2a(y, axis, split_axis=1)  # [G, P_dst, E_loc, C, d]
    return y.reshape(g, e, c, d)

  return expert_fn


def num_token_shards(mesh: Mesh) -> int:
  """Devices the token groups are split over: mesh.data * mesh.expert."""
  return math.prod(mesh.shape[a] for a in TOKEN_AXES)


def check_expert_parallel(
  mesh: Mesh,
  cfg: MoEConfig,
  num_groups: int | None = None,
  batch_shape: Sequence[int] | None = None,
  mesh_path: str = "mesh",
) -> None:
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
    raise ValueError(
      f"the expert-parallel MoE layer needs a mesh with axes {MESH_AXES} "
      f"(moejax.parallel.make_mesh); got axes {mesh.axis_names}"
    )
  validate_mesh_for_moe(mesh, cfg, mesh_path)
  if num_groups is None:
    return
  shards = num_token_shards(mesh)
  if num_groups % shards:
    tokens = "x".join(str(n) for n in batch_shape) if batch_shape is not None else "?"
    per_sequence = " (one per sequence: group_size=None)" if cfg.group_size is None else ""
    allowed = (
      f"the {tokens} input tokens form {num_groups} routing groups{per_sequence}, "
      f"not divisible "
      f"by the {shards} token shards ({mesh_path}.data * {mesh_path}.expert = "
      f"{mesh.shape['data']} * {mesh.shape['expert']}); whole groups are split "
      f"over devices, so choose data.global_batch_size and "
      f"{cfg.config_path}.group_size so that batch * length / group_size is a "
      f"multiple of {shards}"
    )
    if cfg.group_size is None:
      b = batch_shape[0] if batch_shape is not None else num_groups
      raise config_error("data.global_batch_size", b, allowed)
    raise config_error(f"{cfg.config_path}.group_size", cfg.group_size, allowed)


def rows_per_device(num_assignments: int, num_devices: int, cfg: MoEConfig) -> int:
  """R, the static bound on rows one device sends to one other (see the module docstring):
  min(A, max(ragged_buffer_min_rows, ceil(ragged_buffer_factor * A / P)))."""
  a = num_assignments
  bound = math.ceil(cfg.ragged_buffer_factor * a / num_devices)
  return max(1, min(a, max(cfg.ragged_buffer_min_rows, bound)))


def padded_exchange(send: jax.Array, send_sizes: jax.Array, axis: str):
  """CPU fallback: the whole [P, R, d] buffer, one dense all_to_all each way.

  Args: send [P_dst * R, d] (block q: rows for expert device q, used rows first);
    send_sizes i32[P_dst] used rows per block (unused by this exchange).
  Returns (received rows [P_src * R, d], back(y [P_src * R, d]) -> [P_dst * R, d]).
  """
  del send_sizes
  p = jax.lax.axis_size(axis)
  p_r, d = send.shape
  recv = dispatch_a2a(send.reshape(p, p_r // p, d), axis, split_axis=0)  # [P_src, R, d]

  def back(y):
    return combine_a2a(y.reshape(p, p_r // p, d), axis, split_axis=0).reshape(p_r, d)

  return recv.reshape(p_r, d), back


def ragged_exchange(send: jax.Array, send_sizes: jax.Array, axis: str):
  """gpu/tpu: ``jax.lax.ragged_all_to_all`` fills the same [P_src * R, d] layout as
  ``padded_exchange`` but moves only the used rows. UNTESTED (XLA:CPU rejects the op).

  Block q of `send` (rows [q R, q R + send_sizes[q])) lands at rows [me R, ...) of device
  q's buffer; the sizes are exchanged first with a small all_to_all.
  """
  p = jax.lax.axis_size(axis)
  p_r = send.shape[0]
  r = p_r // p
  me = jax.lax.axis_index(axis)
  offsets = jnp.arange(p, dtype=jnp.int32) * r  # block q starts at q R on both sides
  recv_sizes = jax.lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)  # [P_src]
  out_offsets = jnp.full((p,), me * r, jnp.int32)  # my block in each receiver's buffer
  recv = jax.lax.ragged_all_to_all(
    send, jnp.zeros_like(send), offsets, send_sizes, out_offsets, recv_sizes, axis_name=axis
  )
  recv = checkpoint_name(recv, "moe_dispatch_a2a")

  def back(y):
    out = jax.lax.ragged_all_to_all(
      y, jnp.zeros_like(y), offsets, recv_sizes, out_offsets, send_sizes, axis_name=axis
    )
    return checkpoint_name(out, "moe_combine_a2a")

  return recv, back


EXCHANGES = {"padded_all_to_all": padded_exchange, "ragged_all_to_all": ragged_exchange}


def dropless_expert_parallel(
  x: jax.Array,
  routing: Routing,
  probs: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  cfg: MoEConfig,
  axis: str = EXPERT_AXIS,
  model_axis: str | None = MODEL_AXIS,
):
  """Dropless experts inside ``shard_map``: rows exchanged over `axis` (module docstring).

  Args:
    x: [G_loc, S, d]; routing: assignment form; probs: f32[G_loc, S, R] (metrics);
    w_gate, w_up [E_loc, d, f_loc]; w_down [E_loc, f_loc, d].
  Returns:
    (y [G_loc, S, d], metrics of the kept assignments: equal to the router's unless the
    row bound R dropped some, which 'dropped_fraction' then counts).
  """
  g, s, d = x.shape
  k = routing.expert_index.shape[-1]
  a = g * s * k
  e_loc = w_gate.shape[0]
  p = jax.lax.axis_size(axis)
  r = rows_per_device(a, p, cfg)
  expert = routing.expert_index.reshape(a)
  valid = routing.valid.reshape(a)
  dest = jnp.where(valid, expert // e_loc, 0)
  rank, _ = rank_in_group(dest, valid, p)
  kept = valid & (rank < r)
  slot = jnp.where(kept, dest * r + rank, p * r)  # [A]; p * r: not sent
  send_assign = (
    jnp.full((p * r,), a, jnp.int32).at[slot].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
  )  # assignment of each send row; a: none
  send_expert = jnp.full((p * r,), e_loc, jnp.int32).at[slot].set(expert % e_loc, mode="drop")
  send_sizes = jnp.zeros((p,), jnp.int32).at[jnp.where(kept, dest, p)].add(1, mode="drop")
  x_assign = jnp.broadcast_to(x[:, :, None], (g, s, k, d)).reshape(a, d)
  send = permute_rows(x_assign, send_assign, slot)  # [P_dst * R, d], zeros where unused
  recv, back = EXCHANGES[cfg.resolved_ep_exchange()](send, send_sizes, axis)
  recv_expert = jax.lax.all_to_all(send_expert.reshape(p, r), axis, 0, 0, tiled=True).reshape(
    p * r
  )  # local expert, e_loc: none
  used = recv_expert < e_loc
  y_rows = grouped_ffn(
    recv,
    jnp.where(used, recv_expert, 0),
    used,
    w_gate,
    w_up,
    w_down,
    cfg.activation,
    cfg.resolved_expert_impl(),
    cfg.expert_block_size,
  )  # [P_src * R, d]
  if model_axis is not None:
    y_rows = jax.lax.psum(y_rows, model_axis)
  y_assign = permute_rows(back(y_rows), slot, send_assign).reshape(g, s, k, d)
  kept = kept.reshape(g, s, k)
  y = combine_assignments(y_assign, routing, kept)
  metrics = assignment_metrics(routing.expert_index, routing.valid, kept, probs, cfg.num_experts)
  return y, metrics


def expert_parallel_forward(
  x: jax.Array,
  router_kernel: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  cfg: MoEConfig,
  mesh: Mesh,
  batch_shape: Sequence[int] | None = None,
  router_bias: jax.Array | None = None,
):
  """``moe_forward`` with groups split over ('data', 'expert') and experts exchanged.

  Same arguments and results as ``moejax.layers.routed.moe_forward`` (x [G, S, d], all E
  experts' weights as global arrays; y [G, S, d], aux_losses, metrics), plus the `mesh`.
  Call it under ``jax.jit`` (GSPMD moves the arguments to the specs of the module
  docstring). Capacity configs exchange slot buffers (``all_to_all_experts``); dropless
  token choice exchanges rows (``dropless_expert_parallel``).
  """
  check_expert_parallel(mesh, cfg, x.shape[0], batch_shape)

  def per_device(x, router_kernel, router_bias, w_gate, w_up, w_down):
    logits = router_logits(x, router_kernel)
    if cfg.sorted_dropless:
      routing = route(logits, cfg, slots=False, bias=router_bias)
      probs = jax.nn.softmax(logits, axis=-1)
      y, kept_metrics = dropless_expert_parallel(x, routing, probs, w_gate, w_up, w_down, cfg)
      metrics = dict(
        routing.metrics,
        **{n: kept_metrics[n] for n in ("expert_load", "dropped_fraction", "experts_per_token")},
      )
    else:
      routing = route(logits, cfg, bias=router_bias)
      y = slot_experts(x, routing, w_gate, w_up, w_down, cfg, all_to_all_experts(cfg))
      metrics = routing.metrics
    mean = lambda t: jax.tree.map(lambda v: jax.lax.pmean(v, TOKEN_AXES), t)
    return y, mean(routing.aux_losses), mean(metrics)

  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(GROUP_SPEC, ROUTER_SPEC, ROUTER_SPEC, W_IN_SPEC, W_IN_SPEC, W_OUT_SPEC),
    out_specs=(GROUP_SPEC, P(), P()),
  )(x, router_kernel, router_bias, w_gate, w_up, w_down)


__all__ = [
  "all_to_all_experts",
  "check_expert_parallel",
  "dropless_expert_parallel",
  "expert_parallel_forward",
  "num_token_shards",
  "rows_per_device",
]
