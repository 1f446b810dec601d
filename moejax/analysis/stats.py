"""Per-layer expert statistics from the sums of ``moejax.analysis.collect``.

Tokens per expert and load fraction, router entropy (nats), dropped rate, co-activation,
max |FFN_e(x_t)| and super experts (Su et al., 2025, "Unveiling Super Experts in
Mixture-of-Experts Large Language Models"): expert e is one iff it processed a token and
its max |activation| > threshold (10) x the median of the active experts' maxima.
"""

from __future__ import annotations

import math

import numpy as np

from moejax.config import ModelConfig

DEFAULT_SUPER_THRESHOLD = 10.0


def super_experts(
  max_abs: np.ndarray, active: np.ndarray, threshold: float = DEFAULT_SUPER_THRESHOLD
) -> tuple[list[int], np.ndarray]:
  """(flagged expert indices, ratio [E] = max_abs / median of active experts' max_abs).

  Experts that processed no token (active False) have ratio 0 and are never flagged.
  """
  max_abs = np.asarray(max_abs, np.float64)
  active = np.asarray(active, bool)
  if not active.any():
    return [], np.zeros_like(max_abs)
  median = float(np.median(max_abs[active]))
  ratio = np.where(active, max_abs / max(median, 1e-30), 0.0)
  return [int(e) for e in np.flatnonzero(active & (ratio > threshold))], ratio


def layer_report(
  sums: dict, model_cfg: ModelConfig, super_threshold: float = DEFAULT_SUPER_THRESHOLD
) -> dict:
  """JSON-ready statistics of one MoE layer from its accumulated sums."""
  moe = model_cfg.moe
  tokens = float(sums["tokens"])
  processed = np.asarray(sums["processed"])
  selected_total = float(np.sum(sums["selected"]))
  dropped = max(selected_total - float(np.sum(processed)), 0.0)
  flagged, ratio = super_experts(sums["max_abs"], processed > 0, super_threshold)
  return {
    "tokens": tokens,
    "tokens_per_expert": processed.tolist(),
    "load_fraction": (processed / max(processed.sum(), 1.0)).tolist(),
    "selected_per_expert": np.asarray(sums["selected"]).tolist(),
    "assignments_selected": selected_total,
    "assignments_dropped": dropped,
    "dropped_rate": dropped / max(selected_total, 1.0),
    "unprocessed_token_rate": float(sums["unprocessed"]) / max(tokens, 1.0),
    "router_entropy": float(sums["entropy"]) / max(tokens, 1.0),
    "router_entropy_max": math.log(moe.num_router_logits),
    "mean_router_prob": (np.asarray(sums["prob"]) / max(tokens, 1.0)).tolist(),
    "coactivation": np.asarray(sums["coactivation"]).tolist(),
    "max_abs_activation": np.asarray(sums["max_abs"]).tolist(),
    "max_abs_ratio_to_median": ratio.tolist(),
    "super_experts": flagged,
  }


def build_report(
  sums_per_layer: dict[int, dict],
  model_cfg: ModelConfig,
  super_threshold: float = DEFAULT_SUPER_THRESHOLD,
  **meta,
) -> dict:
  """The whole report: run metadata (`meta`), the rule's threshold and every MoE layer."""
  moe = model_cfg.moe
  return {
    **meta,
    "num_experts": moe.num_experts,
    "num_null_experts": moe.num_null_experts,
    "top_k": moe.top_k,
    "router": moe.router,
    "super_expert_rule": (
      f"max_abs_activation > {super_threshold} x median over active experts of the layer"
    ),
    "super_threshold": super_threshold,
    "layers": {
      str(i): layer_report(sums, model_cfg, super_threshold)
      for i, sums in sorted(sums_per_layer.items())
    },
  }
