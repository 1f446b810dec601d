"""A jitted prefill + KV-cached decode loop over a batch of prompts.

Prompts are left-padded to the longest, P tokens; the cache has M = P + N slots for N new
tokens. Row b's real tokens sit at positions 0.. (RoPE) whatever its padding, and a token
attends to the cached slots m <= its own slot that hold real tokens:

  prefill:  logits, cache = model(tokens [B, P], positions, DecodeStep(0, mask [B, P, M]))
  step t:   logits, cache = model(next [B, 1], P_b + t, DecodeStep(P + t, mask [B, 1, M]))

Routers run in inference mode (``inference_model_config``): token choice without capacity
(dropless), so a token's experts never depend on other tokens and cached decoding equals
the full causal forward. Expert choice is refused: an expert picks its tokens among all
tokens of a group, later ones included, which has no causal decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.inference.contrast import ContrastConfig, contrast_logits, weak_model_config
from moejax.inference.sampling import SamplingConfig, sample
from moejax.models.kv_cache import DecodeStep


def inference_model_config(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> ModelConfig:
  """`cfg` for decoding: unrolled layers, no remat, and MoE routers that drop nothing
  (dropless, one routing group per call, and an expert-parallel exchange buffer that
  holds every assignment). Raises ValueError for expert choice (module docstring)."""
  moe = cfg.moe
  if moe is not None:
    if not moe.is_token_choice:
      raise ValueError(
        "model.moe.router='expert_choice' cannot generate: each expert picks its tokens "
        "among all tokens of a routing group, later tokens included, so it has no causal "
        "(token by token) decoding. Generation needs a token-choice router."
      )
    expert_shards = 1 if mesh is None else mesh.shape.get("expert", 1)
    moe = dataclasses.replace(
      moe,
      dropless=True,
      group_size=None,
      ragged_buffer_factor=max(moe.ragged_buffer_factor, float(expert_shards)),
    )
  return dataclasses.replace(cfg, moe=moe, scan_layers=False, remat=False, remat_policy="none")


def left_pad(
  prompts: Sequence[Sequence[int]], pad_id: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [rows, P], valid bool [rows, P]): prompts right-aligned; extra rows
  (to fill a mesh) are all padding."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  length = max(len(p) for p in prompts)
  tokens = np.full((rows, length), pad_id, np.int32)
  valid = np.zeros((rows, length), bool)
  for b, p in enumerate(prompts):
    tokens[b, length - len(p) :] = p
    valid[b, length - len(p) :] = True
  return tokens, valid


def _next_logits(logits: tuple, beta_alpha) -> jax.Array:
  """The logits the next token is drawn from: the model's, or SCMoE's contrast of the
  strong and weak passes (``moejax.inference.contrast``)."""
  if len(logits) == 1:
    return logits[0]
  return contrast_logits(logits[0], logits[1], beta_alpha[0], beta_alpha[1])


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(
  models, params, tokens, valid, max_new_tokens, sampling, return_logits, rng, beta_alpha
):
  """tokens, valid [B, P] -> new tokens int32 [B, N] (and their logits [B, N, V]).

  `models`: one Transformer, or (strong, weak) for SCMoE contrast with f32[2]
  `beta_alpha`; each model keeps its own KV cache."""
  b, p = tokens.shape
  m = p + max_new_tokens
  slot = jnp.arange(m)
  key_valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), bool)], axis=1)  # [B, M]
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
  mask = key_valid[:, None, :] & (slot[None, None, :] <= jnp.arange(p)[None, :, None])
  outs = [
    model.apply(
      {"params": params}, tokens, positions, DecodeStep(jnp.int32(0), mask), mutable=["cache"]
    )
    for model in models
  ]
  caches = tuple(state["cache"] for _, state in outs)
  last = _next_logits(tuple(logits[:, -1] for (logits, _), _ in outs), beta_alpha)  # [B, V]
  first = sample(last, jax.random.fold_in(rng, 0), sampling)
  lengths = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]

  def step(carry, t):
    caches, token, _ = carry
    index = p + t
    step_mask = key_valid[:, None, :] & (slot[None, None, :] <= index)  # [B, 1, M]
    outs = [
      model.apply(
        {"params": params, "cache": cache},
        token[:, None],
        (lengths + t)[:, None],
        DecodeStep(index, step_mask),
        mutable=["cache"],
      )
      for model, cache in zip(models, caches)
    ]
    caches = tuple(new["cache"] for _, new in outs)
    logits = _next_logits(tuple(out[:, 0] for (out, _), _ in outs), beta_alpha)  # [B, V]
    nxt = sample(logits, jax.random.fold_in(rng, t + 1), sampling)
    return (caches, nxt, logits), (nxt, logits if return_logits else None)

  steps = jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
  _, (rest, rest_logits) = jax.lax.scan(step, (caches, first, last), steps)
  new_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, N]
  if not return_logits:
    return new_tokens, None
  return new_tokens, jnp.concatenate([last[:, None], jnp.moveaxis(rest_logits, 0, 1)], axis=1)


def generate_tokens(
  model,
  params,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  sampling: SamplingConfig | None = None,
  *,
  eos_id: int | None = None,
  pad_id: int = 0,
  seed: int = 0,
  return_logits: bool = False,
  contrast: ContrastConfig | None = None,
):
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` ids.

  `model`: a ``Transformer`` of ``inference_model_config(cfg, mesh)`` (on a mesh, the
  batch is padded to a multiple of the token shards). Returns the new ids per prompt, cut
  after the first `eos_id`; with return_logits also float32 [len(prompts), N, V], the
  logits each new token was drawn from. `sampling` default: greedy. `contrast`: SCMoE
  self-contrast decoding against a weak routing of the same params (``contrast``
  module); the logits returned are then the contrast logits (-inf outside V_valid).
  """
  sampling = SamplingConfig() if sampling is None else sampling
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  cfg = model.cfg
  if cfg.moe is not None and (not cfg.moe.dropless or cfg.moe.group_size is not None):
    raise ValueError("generate_tokens needs a model of inference_model_config(cfg)")
  longest = max(len(p) for p in prompts) + max_new_tokens
  if longest > cfg.max_len:
    raise ValueError(
      f"prompt + max_new_tokens = {longest} tokens exceeds model.max_len={cfg.max_len}"
    )
  shards = 1
  if model.mesh is not None:
    shards = int(np.prod([model.mesh.shape[a] for a in ("data", "expert")]))
  rows = -(-len(prompts) // shards) * shards
  tokens, valid = left_pad(prompts, pad_id, rows)
  models, beta_alpha = (model,), None
  if contrast is not None:
    models = (model, model.clone(cfg=weak_model_config(cfg, contrast.weak)))
    beta_alpha = jnp.asarray([contrast.beta, contrast.alpha], jnp.float32)
  new, logits = _generate(
    models,
    params,
    jnp.asarray(tokens),
    jnp.asarray(valid),
    max_new_tokens,
    sampling,
    return_logits,
    jax.random.key(seed),
    beta_alpha,
  )
  new = np.asarray(jax.device_get(new))[: len(prompts)]
  out = []
  for row in new.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    out.append(row)
  if return_logits:
    return out, np.asarray(jax.device_get(logits))[: len(prompts)]
  return out
