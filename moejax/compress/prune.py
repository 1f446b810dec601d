"""Expert pruning: score experts on a few in-domain batches, keep the top R per layer.

* ``easy_ep`` -- EASY-EP (Dong et al., 2025, "Domain-Specific Pruning of Large
  Mixture-of-Experts Models with Few-shot Demonstrations"):
  I_e = sum_{t routed to e} g_{t,e} ||FFN_e(x_t)||_2.
* ``premoe`` -- PreMoe (Zhang et al., 2025, "PreMoe: Lightening MoEs on Constrained
  Memory by Expert Pruning and Retrieval"): TCESS_e = mean_t softmax(l_t)_e.

Kept experts stay in their original order, so R = E reproduces the model bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import numpy as np

from moejax.compress.merge import EXPERT_PARAMS
from moejax.config import ExperimentConfig, ModelConfig
from moejax.errors import config_error


def easy_ep_scores(sums: dict) -> np.ndarray:
  """EASY-EP importance I_e = sum_t g_{t,e} ||FFN_e(x_t)|| over routed tokens, [E]."""
  return np.asarray(sums["gate_norm"], np.float64)


def premoe_scores(sums: dict) -> np.ndarray:
  """PreMoe expected selection score mean_t p_{t,e} over the real experts, [E]."""
  e = np.asarray(sums["processed"]).shape[0]
  return np.asarray(sums["prob"], np.float64)[:e] / max(float(sums["tokens"]), 1.0)


SCORERS: dict[str, Callable[[dict], np.ndarray]] = {
  "easy_ep": easy_ep_scores,
  "premoe": premoe_scores,
}


def top_experts(scores: np.ndarray, keep: int) -> list[int]:
  """Indices of the `keep` highest scores (ties: lower index), in ascending order."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return sorted(int(e) for e in order[:keep])


def prune_ffn(ffn: dict, keep: list[int]) -> dict:
  """One MoE layer's params with only experts `keep` (router columns and [E, ...] tensors).

  Router columns beyond E (null experts) and other entries (shared experts) are kept.
  """
  num_experts = np.asarray(ffn["wi_gate"]).shape[0]
  out = dict(ffn)
  for name in EXPERT_PARAMS:
    out[name] = np.asarray(ffn[name])[keep]
  router = np.asarray(ffn["router"])
  out["router"] = np.concatenate([router[:, keep], router[:, num_experts:]], axis=1)
  return out


def prune_params(params, model_cfg: ModelConfig, keep_per_layer: dict[int, list[int]]) -> dict:
  """Applies `prune_ffn` to every MoE layer (all must be listed, with equally many kept)."""
  params = dict(flax.core.unfreeze(params))
  for i in model_cfg.moe_layers:
    layer = dict(params[f"layers_{i}"])
    layer["ffn"] = prune_ffn(layer["ffn"], keep_per_layer[i])
    params[f"layers_{i}"] = layer
  return params


def check_keep(keep: int, model_cfg: ModelConfig) -> None:
  e = model_cfg.moe.num_experts
  if not isinstance(keep, int) or not 1 <= keep <= e:
    raise config_error("keep", keep, f"must be an int in [1, model.moe.num_experts={e}]")


def pruned_config(config: ExperimentConfig, keep: int) -> ExperimentConfig:
  """The experiment config with num_experts = keep, top_k = min(top_k, keep + N)."""
  moe = config.model.moe
  return config.replace_fields(
    {
      "model.moe.num_experts": keep,
      "model.moe.top_k": min(moe.top_k, keep + moe.num_null_experts),
    }
  )


def prune_model(
  config: ExperimentConfig,
  model_cfg: ModelConfig,
  params,
  sums_per_layer: dict[int, dict],
  keep: int,
  method: str,
):
  """(new config, pruned params, {layer: kept expert indices}, {layer: scores})."""
  if method not in SCORERS:
    raise config_error("method", method, f"allowed: {sorted(SCORERS)}")
  check_keep(keep, model_cfg)
  scores = {i: SCORERS[method](sums_per_layer[i]) for i in model_cfg.moe_layers}
  kept = {i: top_experts(s, keep) for i, s in scores.items()}
  return pruned_config(config, keep), prune_params(params, model_cfg, kept), kept, scores
