"""Next-token choice from logits: greedy, or temperature / top-k / top-p (nucleus; Holtzman
et al., 2020) sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy (argmax); top_k 0 = no top-k cut; top_p 1 = no nucleus cut."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"--top_k must be an int >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [B, V] / T with tokens outside the top-k and outside the nucleus at -inf.

  Nucleus: the fewest most-probable tokens whose probabilities sum to >= top_p (a token
  is kept iff the mass of the tokens strictly more probable than it is < top_p).
  """
  logits = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
  if cfg.top_k:
    kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][..., -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < cfg.top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept logit
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [B, V] -> token ids int32 [B]."""
  if cfg.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
