"""Decoder-only transformer with dense or Mixture-of-Experts FFN layers (Flax linen).

  logits f32[B, L, V], aux = Transformer(cfg, mesh).apply({'params': params}, tokens i32[B, L])
  h_0 = E[tokens];  a_i = h_i + Attn_i(RMSNorm(h_i));  h_{i+1} = a_i + FFN_i(RMSNorm(a_i))
  logits = RMSNorm(h_N) W_lm   (W_lm = E^T when tied)

Attn is GQA or MLA, FFN_i a SwiGLU or ``MoELayer`` (``cfg.is_moe_layer(i)``); aux holds the
aux losses summed over MoE layers and each layer's metrics. Norms, logits and the residual
stream are float32, matmuls ``cfg.dtype``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.errors import config_error
from moejax.layers import DenseFFN, MoELayer
from moejax.models.attention import Attention, fan_in_init
from moejax.models.kv_cache import DecodeStep
from moejax.models.layer_stack import SCAN_KEY, scan_plan
from moejax.models.mla import MLAttention
from moejax.models.norms import RMSNorm
from moejax.models.remat import remat_module
from moejax.models.rope import (
  interleaved_rope_angles,
  rope_angles,
  yarn_rope_angles,
  yarn_softmax_multiplier,
)


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def mla_rope_angles(positions: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [(B,) L, D_r / 2] of MLA's interleaved RoPE, YaRN-scaled if configured."""
  dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
  if cfg.rope_scaling != "yarn":
    return interleaved_rope_angles(positions, dim, theta)
  return yarn_rope_angles(
    positions,
    dim,
    theta,
    cfg.rope_factor,
    cfg.rope_original_max_len,
    cfg.rope_beta_fast,
    cfg.rope_beta_slow,
    cfg.rope_mscale,
    cfg.rope_mscale_all_dim,
  )


def mla_softmax_scale(cfg) -> float:
  """(D_n + D_r)^-1/2, times DeepSeek's YaRN mscale(s, mscale_all_dim)^2 if configured."""
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  if cfg.rope_scaling == "yarn":
    scale *= yarn_softmax_multiplier(cfg.rope_factor, cfg.rope_mscale_all_dim)
  return scale


class Block(nn.Module):
  """One pre-norm transformer block: ``h, aux = Block(cfg, layer)(h, cos, sin)``; the
  attention is GQA or MLA (``cfg.attention``), cos/sin the matching RoPE tables."""

  cfg: ModelConfig
  layer: int
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(
    self,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    decode: DecodeStep | None = None,
    task_id=None,
    router_logits=None,
  ):
    cfg = self.cfg
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    x = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="attn_norm")(h)
    if cfg.attention == "mla":
      y = MLAttention(
        cfg.num_heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.q_lora_rank,
        dtype,
        param_dtype,
        cfg.attention_impl,
        mla_softmax_scale(cfg),
        name="attn",
      )(x, cos, sin, decode)
    else:
      y = Attention(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        dtype,
        param_dtype,
        cfg.attention_impl,
        cfg.qk_norm,
        cfg.clip_qkv,
        cfg.rms_norm_eps,
        cfg.attention_bias,
        name="attn",
      )(x, cos, sin, decode)
    h = h + y.astype(h.dtype)
    x = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="ffn_norm")(h)
    if cfg.is_moe_layer(self.layer):
      y, aux = MoELayer(cfg.moe, dtype, param_dtype, mesh=self.mesh, name="ffn")(
        x, task_id, router_logits
      )
    else:
      y, aux = DenseFFN(
        cfg.d_ff, activation="silu", dtype=dtype, param_dtype=param_dtype, name="ffn"
      )(x)
    return h + y.astype(h.dtype), aux


class Transformer(nn.Module):
  """The decoder-only LM (module docstring). Params: ``layers_{i}/{attn_norm, attn, ffn_norm,
  ffn}`` (``scanned_layers/block_{j}`` with ``scan_layers``), each leaf boxed with its logical
  axes; embedding init N(0, 1), N(0, 1/d) when tied; kernels fan-in variance scaling.

  Attributes:
    cfg: the validated ModelConfig.
    mesh: the device mesh, handed to the MoE layers for expert parallelism (None: all
      experts on one device).
  """

  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    decode: DecodeStep | None = None,
    task_id: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """tokens [B, L]; positions int [L] or [B, L] (RoPE; default 0..L-1); decode: a cached
    forward (``moejax.models.kv_cache``; needs unrolled layers and the 'cache' collection
    mutable); task_id i32[B, L]: each token's task, for router='multigate' (else unused)."""
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"Transformer expects tokens of shape [batch, length], got {tokens.shape}")
    length = tokens.shape[1] if decode is None else decode.mask.shape[-1]
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
    if decode is not None and cfg.scan_layers and scan_plan(cfg).num_units:
      raise ValueError(
        "a cached (decode) forward needs model.scan_layers=False; restore the run unrolled "
        "(moejax.models.layer_stack.unrolled_config)"
      )
    length = tokens.shape[1]
    positions = jnp.arange(length) if positions is None else positions
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    embed_std = cfg.d_model**-0.5 if cfg.tie_embeddings else 1.0
    embedding = Embed(cfg.vocab_size, cfg.d_model, embed_std, param_dtype, name="embed")()
    h = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)  # [B, L, d]
    if cfg.attention == "mla":  # interleaved pairs of the D_r RoPE dims: [L, D_r / 2]
      cos, sin = mla_rope_angles(positions, cfg)
    else:
      cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)  # [(B,) L, Dh]

    pregate = cfg.moe is not None and cfg.moe.router == "pregate"
    if pregate:
      if cfg.scan_layers:
        raise config_error("model.scan_layers", True, "router='pregate' runs unscanned layers")
      pre_logits = PreGate(cfg.moe, len(cfg.moe_layers), param_dtype, name="pregate")(h)
    if cfg.moe is not None and cfg.moe.router == "multigate" and task_id is None:
      task_id = jnp.zeros(tokens.shape, jnp.int32)  # e.g. init with a dummy batch
    aux_losses: dict[str, jax.Array] = {}
    metrics: dict[str, dict] = {}

    def add_aux(layer: int, aux: dict) -> None:
      for k, v in aux["aux_losses"].items():
        aux_losses[k] = aux_losses.get(k, 0.0) + v
      metrics[f"layers_{layer}"] = aux["metrics"]

    plan = scan_plan(cfg)
    scanned = plan.scanned if cfg.scan_layers and plan.num_units else range(0)
    block_cls = remat_module(Block, cfg.remat_mode) if decode is None else Block
    for i in range(cfg.num_layers):
      if i in scanned:
        if i == scanned.start:
          h, unit_aux = ScannedUnits(cfg, self.mesh, name=SCAN_KEY)(h, cos, sin, task_id)
          for j, aux in unit_aux.items():  # stacked over the U units
            for u in range(plan.num_units):
              add_aux(plan.layer(u, j), jax.tree.map(lambda x, u=u: x[u], aux))
        continue
      logits_i = (
        pre_logits[:, :, cfg.moe_layers.index(i)] if pregate and cfg.is_moe_layer(i) else None
      )
      h, aux = block_cls(cfg, i, self.mesh, name=f"layers_{i}")(
        h, cos, sin, decode, task_id, logits_i
      )
      if cfg.is_moe_layer(i):
        add_aux(i, aux)

    x = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="final_norm")(h)
    if cfg.tie_embeddings:
      logits = jnp.einsum(
        "bld,vd->blv", x, embedding.astype(dtype), preferred_element_type=jnp.float32
      )
    else:
      logits = LMHead(cfg.vocab_size, dtype, param_dtype, name="lm_head")(x)
    return logits.astype(jnp.float32), {"aux_losses": aux_losses, "metrics": metrics}


class BlockUnit(nn.Module):
  """One repeating unit of ``scan_plan(cfg).unit`` blocks (``moejax.models.layer_stack``):
  ``h, {j: aux_j for its MoE blocks j} = BlockUnit(cfg)(h, cos, sin)``; block j plays
  layer start + j (all units have the same dense/MoE pattern)."""

  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, task_id=None):
    cfg, plan = self.cfg, scan_plan(self.cfg)
    block_cls = remat_module(Block, cfg.remat_mode, prevent_cse=False)
    unit_aux = {}
    for j in range(plan.unit):
      layer = plan.layer(0, j)
      h, aux = block_cls(cfg, layer, self.mesh, name=f"block_{j}")(h, cos, sin, None, task_id)
      if cfg.is_moe_layer(layer):
        unit_aux[j] = aux
    return h, unit_aux


def ScannedUnits(cfg: ModelConfig, mesh, name: str) -> nn.Module:
  """``nn.scan`` of BlockUnit over the U units: params stacked on a leading 'layers'
  axis (h carried, cos/sin broadcast, aux stacked)."""
  scan = nn.scan(
    BlockUnit,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
    length=scan_plan(cfg).num_units,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scan(cfg, mesh, name=name)


class PreGate(nn.Module):
  """Read-ME's router network decoupled from the backbone (``moejax.routers.pregate``):
  embeddings h [B, L, d] -> every MoE layer's logits f32[B, L, M, R],
  ``W_2 silu(W_1 RMSNorm(h))`` with ``w1`` [d, H] and ``w2`` [H, M, R]."""

  cfg: object  # MoEConfig
  num_moe_layers: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    m, r, hid = self.num_moe_layers, self.cfg.num_router_logits, self.cfg.pregate_d_hidden
    x = RMSNorm(1e-6, jnp.float32, self.param_dtype, name="norm")(h)
    w1 = self.param(
      "w1",
      nn.with_logical_partitioning(fan_in_init((0,), (1,)), ("embed", None)),
      (h.shape[-1], hid),
      self.param_dtype,
    )
    w2 = self.param(
      "w2",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "router")),
      (hid, m, r),
      self.param_dtype,
    )
    z = jax.nn.silu(jnp.einsum("bld,dh->blh", x.astype(jnp.float32), w1.astype(jnp.float32)))
    return jnp.einsum("blh,hmr->blmr", z, w2.astype(jnp.float32))


def pregate_choices(cfg: ModelConfig, params, tokens: jax.Array):
  """Every MoE layer's experts for `tokens` i32[B, L] from the pre-gating network alone
  (router='pregate'), before any block runs: (expert_index i32[B, L, M, K], valid
  bool[B, L, M, K]) for the M = len(cfg.moe_layers) layers, as the layers route them
  (group structure ignored: dropless token choice does not depend on it)."""
  from moejax.routers import route

  h = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(jnp.float32)
  logits = PreGate(cfg.moe, len(cfg.moe_layers)).apply({"params": params["pregate"]}, h)
  b, l, m, r = logits.shape
  routing = route(jnp.moveaxis(logits, 2, 0).reshape(m * b, l, r), cfg.moe, slots=False)
  k = routing.expert_index.shape[-1]
  back = lambda a: jnp.moveaxis(a.reshape(m, b, l, k), 0, 2)
  return back(routing.expert_index), back(routing.valid)


class Embed(nn.Module):
  """The token embedding table ``embedding`` [V, d] ('vocab', 'embed'), N(0, stddev^2)."""

  vocab_size: int
  d_model: int
  stddev: float = 1.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(self.stddev), ("vocab", "embed")),
      (self.vocab_size, self.d_model),
      self.param_dtype,
    )


class LMHead(nn.Module):
  """logits = x W, ``kernel`` [d, V] ('embed', 'vocab'); float32 accumulation and output."""

  vocab_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(fan_in_init((0,), (1,)), ("embed", "vocab")),
      (x.shape[-1], self.vocab_size),
      self.param_dtype,
    )
    return jnp.einsum(
      "bld,dv->blv",
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
