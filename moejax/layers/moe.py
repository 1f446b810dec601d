"""The Mixture-of-Experts FFN layer (Flax linen).

Tokens are grouped [G, S, d] and routed per group (``moejax.routers``). Capacity configs
gather tokens into per-expert slot buffers [G, E, C, d]; dropless token choice sorts the
(token, choice) assignments by expert and runs one grouped matmul over them (see
``moejax.layers.routed``; expert-parallel: ``moejax.layers.expert_parallel``). Expert
weights are stacked [E, d_model, d_ff] arrays whose leading axis carries the logical name
'expert', so expert parallelism shards it (see ``moejax.parallel``). DeepSeekMoE shared
experts run as one dense gated FFN of width num_shared_experts * expert_d_ff on every token.

  y_t = sum_{e in routed(t)} g_{t,e} FFN_e(x_t)  [+ FFN_shared(x_t)]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import expert_parallel as ep
from moejax.layers.ffn import DenseFFN, expert_init
from moejax.layers.routed import moe_forward
from moejax.moe_config import MoEConfig
from moejax.routers import BIASED_ROUTERS
from moejax.routers.multigate import multigate_logits


def to_groups(x: jax.Array, group_size: int | None) -> jax.Array:
  """[B, L, d] -> [G, S, d]; S = L when group_size is None."""
  b, l, d = x.shape
  s = l if group_size is None else group_size
  if (b * l) % s:
    raise ValueError(
      f"MoE input has {b}x{l}={b * l} tokens, not divisible by "
      f"moe.group_size={group_size}; choose a group_size dividing batch*length"
    )
  return x.reshape(b * l // s, s, d)


class MoELayer(nn.Module):
  """Sparse MoE FFN: ``y, aux = MoELayer(cfg)(x)`` with x [B, L, d].

  ``aux = {'aux_losses': {name: weighted scalar}, 'metrics': {name: array}}``.
  ``mesh`` (axes 'data', 'expert', 'model'): the routed experts run expert-parallel
  under ``jax.shard_map`` -- token groups split over ('data', 'expert'), slots exchanged
  with ``all_to_all`` over 'expert', expert hidden widths split over 'model' (see
  ``moejax.layers.expert_parallel``); outputs, aux losses and metrics equal the
  unsharded layer's. Call it under ``jax.jit``.
  """

  cfg: MoEConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  mesh: jax.sharding.Mesh | None = None  # expert-parallel path when set

  @nn.compact
  def __call__(
    self, x: jax.Array, task_id: jax.Array | None = None, router_logits: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    """task_id i32[B, L]: router='multigate' only; router_logits f32[B, L, R]: the
    pre-gating network's logits of this layer (router='pregate' only)."""
    if x.ndim != 3:
      raise ValueError(f"MoELayer expects [batch, length, d_model], got shape {x.shape}")
    cfg = self.cfg
    d, e, f = x.shape[-1], cfg.num_experts, cfg.expert_d_ff
    router_kernel, logits = None, None
    if cfg.router == "pregate":
      if router_logits is None:
        raise ValueError("router='pregate' needs the pre-gating network's router_logits")
      logits = to_groups(router_logits.astype(jnp.float32), cfg.group_size)
    elif cfg.router == "multigate":
      if task_id is None:
        raise ValueError("router='multigate' needs a task_id [batch, length] (data.num_tasks)")
      gates = self.param(
        "router",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed", "router")),
        (cfg.num_tasks, d, cfg.num_router_logits),
        self.param_dtype,
      )
      task = to_groups(task_id[..., None], cfg.group_size)[..., 0]
      logits = multigate_logits(to_groups(x, cfg.group_size), gates, task, cfg)
    else:
      router_kernel = self.param(
        "router",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "router")),
        (d, cfg.num_router_logits),
        self.param_dtype,
      )
    compressed = None
    if cfg.num_compressed_experts:
      compressed = self.param(
        "compressed",
        nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
        (cfg.num_compressed_experts, d),
        self.param_dtype,
      )
    extra = {"logits": logits, "compressed": compressed}
    w_gate = self.param(
      "wi_gate",
      nn.with_logical_partitioning(expert_init, ("expert", "embed", "expert_mlp")),
      (e, d, f),
      self.param_dtype,
    )
    w_up = self.param(
      "wi_up",
      nn.with_logical_partitioning(expert_init, ("expert", "embed", "expert_mlp")),
      (e, d, f),
      self.param_dtype,
    )
    w_down = self.param(
      "wo",
      nn.with_logical_partitioning(expert_init, ("expert", "expert_mlp", "embed")),
      (e, f, d),
      self.param_dtype,
    )
    router_bias = None
    if cfg.router in BIASED_ROUTERS:  # DeepSeek-V3 selection bias; the train step updates it
      router_bias = self.param(
        "router_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("router",)),
        (e,),
        jnp.float32,
      )
    cast = lambda a: jnp.asarray(a, self.dtype)
    groups = to_groups(cast(x), cfg.group_size)
    weights = (router_kernel, cast(w_gate), cast(w_up), cast(w_down))
    if self.mesh is None:
      y, aux_losses, metrics = moe_forward(groups, *weights, cfg, router_bias=router_bias, **extra)
    else:
      if self.is_initializing():
        # Init only needs shapes and often sees a dummy [1, L] batch that need not split
        # over the mesh; the unsharded math creates exactly the same parameters.
        ep.check_expert_parallel(self.mesh, cfg)
        y, aux_losses, metrics = moe_forward(
          groups, *weights, cfg, router_bias=router_bias, **extra
        )
      else:
        y, aux_losses, metrics = ep.expert_parallel_forward(
          groups,
          *weights,
          cfg,
          self.mesh,
          batch_shape=x.shape[:2],
          router_bias=router_bias,
          **extra,
        )
    y = y.reshape(x.shape)
    if cfg.num_shared_experts:
      width = cfg.shared_expert_d_ff or cfg.num_shared_experts * f
      shared, _ = DenseFFN(width, cfg.activation, self.dtype, self.param_dtype, name="shared")(x)
      if cfg.shared_expert_gate:  # Qwen2-MoE: sigmoid(x . w_g) * FFN_shared(x)
        w_g = self.param(
          "shared_gate",
          nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
          (d, 1),
          self.param_dtype,
        )
        gate = jnp.einsum("bld,do->blo", x.astype(jnp.float32), w_g.astype(jnp.float32))
        shared = jax.nn.sigmoid(gate).astype(shared.dtype) * shared
      y = y + shared
    return y, {"aux_losses": aux_losses, "metrics": metrics}
