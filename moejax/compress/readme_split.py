"""Read-ME refactoring (Cai et al., 2024): a trained dense model -> a smaller MoE by
activation sparsity.

Each FFN's hidden units are split into E experts of F / E units by balanced spherical
k-means on their activation patterns a_u = (|h_u(x_t)|)_t / ||.||_2 (MoEfication, Zhang et
al., 2022), so sum_e FFN_e = FFN. Router column e = router_scale x the mean gate vector of
expert e's units; w^down is scaled by top_k; k = E with router_scale = 0 is the dense model.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moejax.analysis.collect import split_batches
from moejax.compress.compressed import eval_loss
from moejax.compress.workflows import target_config
from moejax.config import ExperimentConfig
from moejax.errors import ConfigError, config_error
from moejax.layers.ffn import ACTIVATIONS
from moejax.models import Transformer
from moejax.training.workdir import load_run_config, restore_state, write_run


def balanced_kmeans(features: np.ndarray, num_clusters: int, iters: int = 20, seed: int = 0):
  """Balanced spherical k-means: features [F, T] (rows unit-normalised here) -> labels
  i32[F], each cluster exactly F / num_clusters rows.

  Assignment is greedy over (row, cluster) pairs by descending cosine similarity to the
  centroids, each cluster taking F / K rows; centroids are the normalised means. Starts
  from `num_clusters` distinct rows drawn with `seed`; stops when labels repeat.
  """
  f = features.shape[0]
  if f % num_clusters:
    raise ValueError(f"{f} hidden units do not split into {num_clusters} equal experts")
  size = f // num_clusters
  x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  rng = np.random.default_rng(seed)
  centroids = x[rng.choice(f, num_clusters, replace=False)]
  labels = None
  for _ in range(iters):
    sim = x @ centroids.T  # [F, K]
    order = np.argsort(-sim, axis=None, kind="stable")  # pairs, best first
    new = np.full(f, -1, np.int64)
    room = np.full(num_clusters, size)
    for flat in order:
      u, k = divmod(int(flat), num_clusters)
      if new[u] < 0 and room[k]:
        new[u], room[k] = k, room[k] - 1
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    centroids = np.stack([x[labels == k].mean(axis=0) for k in range(num_clusters)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
  return labels.astype(np.int32)


def split_ffn(
  ffn: dict, labels: np.ndarray, num_experts: int, top_k: int, router_scale: float = 1.0
) -> dict:
  """Dense {'wi_gate' [d, F], 'wi_up' [d, F], 'wo' [F, d]} -> MoE {'wi_gate', 'wi_up'
  [E, d, F/E], 'wo' [E, F/E, d] (x top_k), 'router' [d, E]}; expert e holds the units with
  label e in ascending order."""
  units = [np.flatnonzero(labels == e) for e in range(num_experts)]
  wg, wu, wo = (np.asarray(ffn[n]) for n in ("wi_gate", "wi_up", "wo"))
  return {
    "wi_gate": np.stack([wg[:, u] for u in units]),
    "wi_up": np.stack([wu[:, u] for u in units]),
    "wo": np.stack([wo[u] * top_k for u in units]).astype(wo.dtype),
    "router": np.stack([router_scale * wg[:, u].mean(axis=1) for u in units], axis=1).astype(
      wg.dtype
    ),
  }


def hidden_activations(x: jax.Array, ffn: dict, activation: str = "silu") -> jax.Array:
  """|h| = |act(x W_gate) * (x W_up)|: x [N, d] -> f32[N, F]."""
  x = x.astype(jnp.float32)
  gate = jnp.einsum("nd,df->nf", x, jnp.asarray(ffn["wi_gate"], jnp.float32))
  up = jnp.einsum("nd,df->nf", x, jnp.asarray(ffn["wi_up"], jnp.float32))
  return jnp.abs(ACTIVATIONS[activation](gate) * up)


def activation_patterns(model_cfg, params, batches) -> dict[int, np.ndarray]:
  """{layer i: [F, T]} each hidden unit's |activation| on every unmasked calibration token
  of `batches` (the dense model's FFN inputs, captured at ``ffn_norm``)."""
  model = Transformer(model_cfg)

  @jax.jit
  def run(params, tokens):
    _, state = model.apply(
      {"params": params},
      tokens,
      capture_intermediates=lambda m, name: name == "__call__" and m.name == "ffn_norm",
      mutable=["intermediates"],
    )
    inter = state["intermediates"]
    out = {}
    for i in range(model_cfg.num_layers):
      x = inter[f"layers_{i}"]["ffn_norm"]["__call__"][0]
      out[i] = hidden_activations(x.reshape(-1, x.shape[-1]), params[f"layers_{i}"]["ffn"])
    return out

  pieces: dict[int, list] = {i: [] for i in range(model_cfg.num_layers)}
  for batch in batches:
    tokens = np.asarray(batch["inputs"], np.int32)
    keep = np.asarray(batch.get("mask", np.ones(tokens.shape))).reshape(-1) > 0
    for i, h in jax.device_get(run(params, tokens)).items():
      pieces[i].append(np.asarray(h)[keep])
  if not pieces[0]:
    raise ValueError("no calibration batches")
  return {i: np.concatenate(p).T for i, p in pieces.items()}


def readme_split_params(
  dense_params, patterns: dict, num_experts: int, top_k: int, router_scale: float, seed: int
):
  """(MoE params with every FFN split, {layer: labels}); other params copied."""
  params = dict(flax.core.unfreeze(dense_params))
  labels = {}
  for i, feats in patterns.items():
    labels[i] = balanced_kmeans(feats, num_experts, seed=seed)
    layer = dict(params[f"layers_{i}"])
    layer["ffn"] = split_ffn(layer["ffn"], labels[i], num_experts, top_k, router_scale)
    params[f"layers_{i}"] = layer
  return params, labels


def split_config(config: ExperimentConfig, num_experts: int, top_k: int) -> ExperimentConfig:
  """The dense `config` as every layer MoE: E experts of d_ff / E units, dropless
  renormalised top-k (softmax over the selected logits)."""
  return config.replace_fields(
    {
      "model.moe_every": 1,
      "model.first_moe_layer": 0,
      "model.moe.num_experts": num_experts,
      "model.moe.expert_d_ff": config.model.d_ff // num_experts,
      "model.moe.top_k": top_k,
      "model.moe.router": "topk",
      "model.moe.router_order": "topk_softmax",
      "model.moe.dropless": True,
      "model.moe.activation": "silu",
    }
  )


def readme_split_run(
  workdir: str,
  out: str,
  num_experts: int,
  top_k: int = 2,
  split: str = "train",
  num_batches: int = 2,
  eval_batches: int = 4,
  router_scale: float = 1.0,
  seed: int = 0,
  step: int | None = None,
) -> dict:
  """Dense run `workdir` -> MoE run `out` (every layer MoE, dropless renormalised top-k);
  returns a summary with the eval loss on `eval_batches` validation batches before/after."""
  config = load_run_config(workdir)
  if config.model.moe_every:
    raise ConfigError(f"{workdir} is an MoE model; readme-split takes a dense run")
  d_ff = config.model.d_ff
  if not isinstance(num_experts, int) or num_experts < 2 or d_ff % num_experts:
    raise config_error("num_experts", num_experts, f"must be an int >= 2 dividing d_ff={d_ff}")
  if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
    raise config_error("top_k", top_k, f"must be an int in [1, num_experts={num_experts}]")
  new_config = target_config(split_config(config, num_experts, top_k), out)
  state, _, step, _ = restore_state(config, workdir, step)
  dense_cfg = dataclasses.replace(config.model, scan_layers=False)
  params = jax.device_get(state.params)
  patterns = activation_patterns(dense_cfg, params, split_batches(config, split, num_batches))
  new_params, labels = readme_split_params(params, patterns, num_experts, top_k, router_scale, seed)
  moe_cfg = dataclasses.replace(new_config.model, scan_layers=False)
  before = eval_loss(dense_cfg, params, split_batches(config, "validation", eval_batches))
  after = eval_loss(moe_cfg, new_params, split_batches(config, "validation", eval_batches))
  write_run(new_config, out, new_params)
  return {
    "source": workdir,
    "step": step,
    "num_experts": num_experts,
    "top_k": top_k,
    "eval_loss_before": before,
    "eval_loss_after": after,
    "experts": {str(i): np.bincount(l, minlength=num_experts).tolist() for i, l in labels.items()},
  }
