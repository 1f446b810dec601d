"""Expert parallelism: the MoE layer inside ``jax.shard_map`` with an ``all_to_all`` exchange
(GShard, Lepikhin et al., 2020; Switch, Fedus et al., 2021). README "Expert parallelism"
tells the design; the shapes:

  groups x [G, S, d] P(('data','expert'), None, None); router [d, E+N] (and DeepSeek-V3's
  selection bias [E]) replicated;
  w_gate, w_up [E, d, f] P('expert', None, 'model'); w_down [E, f, d] P('expert', 'model', None)
  -> per device G_loc groups, E_loc = E / P experts (expert e on position e // E_loc), f / M.

Capacity (slots): x_slots [G_loc, P_dst, E_loc, C, d] --all_to_all('expert')--> [G_loc, P_src,
E_loc, C, d]; 'etd,edf->etf' experts; psum over 'model'; all_to_all back; combine. Whole groups
per device, so sharded == unsharded exactly; aux losses / metrics are pmean'd over the token axes.

Dropless (``cfg.sorted_dropless``): rows, not slots. Assignment (t, k) to expert e goes to
position e // E_loc in a [P_dst, R, d] send buffer, R = min(A, max(ragged_buffer_min_rows,
ceil(ragged_buffer_factor * A / P))); rows ranked >= R are dropped and counted in
'dropped_fraction'. 'padded_all_to_all' (CPU) moves the whole buffer; 'ragged_all_to_all'
(gpu/tpu) only the used rows, sizes exchanged first (checked on one GPU by
``benchmarks/accelerator_check.py``; a multi-device ragged exchange has not run yet).

The exchanges are tagged 'moe_dispatch_a2a' / 'moe_combine_a2a' for remat policies.
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
from moejax.layers.grouped import grouped_ffn, permute_rows, rank_in_group, row_sources
from moejax.layers.routed import (
  combine_assignments,
  compressed_output,
  router_logits,
  slot_experts,
)
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
  ``padded_exchange`` but moves only the used rows (XLA:CPU rejects the op; checked on one
  GPU by ``benchmarks/accelerator_check.py``; the CPU tests run this function on 4 and 8
  devices with the op replaced by its documented semantics).

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
  send_assign = row_sources(slot, p * r)  # assignment of each send row; a: none
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
    cfg.resolved_dropless_windows(),
    expected_rows=a,
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
  logits: jax.Array | None = None,
  compressed: jax.Array | None = None,
  router_bias: jax.Array | None = None,
):
  """``moe_forward`` with groups split over ('data', 'expert') and experts exchanged.

  `logits` (f32[G, S, R], split like x) replace the router kernel; `compressed` [J, d]
  compressed-expert vectors are replicated (see ``moe_forward``).

  Same arguments and results as ``moejax.layers.routed.moe_forward`` (x [G, S, d], all E
  experts' weights as global arrays; y [G, S, d], aux_losses, metrics), plus the `mesh`.
  Call it under ``jax.jit`` (GSPMD moves the arguments to the specs of the module
  docstring). Capacity configs exchange slot buffers (``all_to_all_experts``); dropless
  token choice exchanges rows (``dropless_expert_parallel``).
  """
  check_expert_parallel(mesh, cfg, x.shape[0], batch_shape)

  def per_device(
    x, router_kernel, w_gate, w_up, w_down, given_logits=None, compressed=None, router_bias=None
  ):
    logits = router_logits(x, router_kernel) if given_logits is None else given_logits
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
    if compressed is not None:
      y = y + compressed_output(routing, compressed, cfg.num_experts).astype(y.dtype)
    mean = lambda t: jax.tree.map(lambda v: jax.lax.pmean(v, TOKEN_AXES), t)
    return y, mean(routing.aux_losses), mean(metrics)

  # Optional inputs (precomputed logits, compressed vectors, selection bias) travel only
  # when present.
  args = [x, router_kernel, w_gate, w_up, w_down, logits, compressed, router_bias]
  specs = [GROUP_SPEC, ROUTER_SPEC, W_IN_SPEC, W_IN_SPEC, W_OUT_SPEC, GROUP_SPEC, P(), P()]
  if router_kernel is None:
    args[1] = jnp.zeros((), jnp.float32)  # unused placeholder (logits are given)
  present = [i for i, a in enumerate(args) if a is not None]

  def per_device_present(*values):
    full = [None] * len(args)
    for i, v in zip(present, values):
      full[i] = v
    return per_device(*full)

  return jax.shard_map(
    per_device_present,
    mesh=mesh,
    in_specs=tuple(specs[i] for i in present),
    out_specs=(GROUP_SPEC, P(), P()),
  )(*(args[i] for i in present))


__all__ = [
  "all_to_all_experts",
  "check_expert_parallel",
  "dropless_expert_parallel",
  "expert_parallel_forward",
  "num_token_shards",
  "rows_per_device",
]
