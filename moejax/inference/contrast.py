"""SCMoE self-contrast decoding (Shi et al., 2024, "Unchosen Experts Can Contribute Too:
Unleashing MoE Models' Power by Self-Contrast").

Each step runs the params with their own (strong) routing and a weak one (``top1`` or
``rank:K``) and picks from z = (1 + beta) z_strong - beta z_weak on the plausible tokens
p_strong(v) >= alpha max_w p_strong(w), -inf elsewhere (z: raw logits, as the authors'
code). Sampling masks with the untempered strong distribution; each pass keeps its own
KV cache.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.moe_config import MoEConfig


@dataclasses.dataclass(frozen=True)
class ContrastConfig:
  """beta >= 0: contrast strength (0 = standard decoding); alpha in [0, 1]: plausibility
  threshold (paper: 0.1); weak: 'top1' or 'rank:K' (K >= 1)."""

  beta: float = 0.5
  alpha: float = 0.1
  weak: str = "rank:2"

  def __post_init__(self):
    if not (math.isfinite(self.beta) and self.beta >= 0):
      raise ValueError(f"--scmoe_beta must be a finite number >= 0, got {self.beta}")
    if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
      raise ValueError(f"--scmoe_alpha must be in [0, 1], got {self.alpha}")
    parse_weak(self.weak)


def parse_weak(weak: str) -> int:
  """'top1' -> 0, 'rank:K' -> K (K >= 1); ValueError otherwise."""
  if weak == "top1":
    return 0
  head, _, k = weak.partition(":")
  if head == "rank" and k.isdigit() and int(k) >= 1:
    return int(k)
  raise ValueError(f"--scmoe_weak must be 'top1' or 'rank:K' with K >= 1, got {weak!r}")


def weak_moe_config(moe: MoEConfig, weak: str) -> MoEConfig:
  """The weak routing of `moe`: top-1 (``top_k=1``, same router), or rank-K (router
  'rank_k', ``moejax.routers.rank_k``). Raises ValueError where it is undefined."""
  if not moe.is_token_choice:
    raise ValueError(
      f"--decoding scmoe: model.moe.router={moe.router!r} has no weak activation: expert "
      "choice lets experts pick tokens, so 'top-1' or 'the K-th ranked expert of a token' "
      "is undefined. SCMoE needs a token-choice router."
    )
  k = parse_weak(weak)
  if k == 0:
    return dataclasses.replace(moe, top_k=1)
  if moe.num_null_experts:
    raise ValueError(
      f"--scmoe_weak {weak}: rank-K routing is not defined for AdaMoE null experts "
      "(router='null_experts'); use --scmoe_weak top1"
    )
  if k > moe.num_router_logits:
    raise ValueError(
      f"--scmoe_weak {weak}: rank {k} > model.moe has {moe.num_router_logits} router logits"
    )
  return dataclasses.replace(moe, router="rank_k", top_k=k)


def weak_model_config(cfg: ModelConfig, weak: str) -> ModelConfig:
  """`cfg` with every MoE layer's routing replaced by its weak routing."""
  if cfg.moe is None:
    raise ValueError("--decoding scmoe needs an MoE model (model.moe is None)")
  return dataclasses.replace(cfg, moe=weak_moe_config(cfg.moe, weak))


def plausible(strong: jax.Array, alpha) -> jax.Array:
  """bool [B, V]: p_strong(v) >= alpha * max_w p_strong(w), from logits [B, V]
  (compared in log space: z_v - max z >= log alpha)."""
  z = strong.astype(jnp.float32)
  return z - jnp.max(z, axis=-1, keepdims=True) >= jnp.log(jnp.asarray(alpha, jnp.float32))


def contrast_logits(strong: jax.Array, weak: jax.Array, beta, alpha) -> jax.Array:
  """[B, V] -> [B, V]: (1 + beta) * strong - beta * weak on the plausible set, else -inf.
  beta, alpha: floats or traced f32[] (one compiled decode serves every value)."""
  beta = jnp.asarray(beta, jnp.float32)
  z = (1 + beta) * strong.astype(jnp.float32) - beta * weak.astype(jnp.float32)
  return jnp.where(plausible(strong, alpha), z, -jnp.inf)
