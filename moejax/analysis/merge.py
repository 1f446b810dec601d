"""MC-SMoE expert merging (Li et al., 2024, "Merge, Then Compress: Demystify Efficient
SMoE with Hints from Its Routing Policy").

Per MoE layer, over the sampled tokens t (mask 1):

1. Similarity: expert e is represented by its router-logit vector (l_{t,e})_t over the
   tokens; sim(i, j) = <l_i, l_j> / (||l_i|| ||l_j||), computed from the accumulated Gram
   matrix G_ij = sum_t l_{t,i} l_{t,j} as G_ij / sqrt(G_ii G_jj).
2. Dominant experts: the E' most frequently selected experts (a_e = number of tokens
   whose router chose e; ties: lower index). One refinement: an expert that duplicates
   an already chosen dominant one (sim >= 1 - duplicate_tol, i.e. an identical router
   column up to scale) is passed over while other candidates remain, since duplicates
   compute one function and belong in one group.
3. Grouping: every other expert joins its most similar dominant expert. The groups are a
   partition of range(E); group g is listed in the order of the dominant experts' indices.
4. Merging: each group becomes one expert, the a_e-weighted average of its weights and
   router columns (``moejax.convert.upcycle.merge_ffn_experts``).

The merged run has num_experts = E' and top_k = min(top_k, E' + N) unless given.
"""

from __future__ import annotations

import copy

import numpy as np

from moejax.config import ModelConfig
from moejax.convert.upcycle import merge_experts
from moejax.errors import config_error

DUPLICATE_TOL = 1e-6


def router_logit_similarity(logit_gram: np.ndarray) -> np.ndarray:
  """Cosine similarity [E, E] of the experts' router-logit vectors from their Gram matrix."""
  gram = np.asarray(logit_gram, np.float64)
  norm = np.sqrt(np.maximum(np.diag(gram), 1e-30))
  return np.clip(gram / norm[:, None] / norm[None, :], -1.0, 1.0)


def dominant_experts(frequency: np.ndarray, similarity: np.ndarray, num_groups: int,
                     duplicate_tol: float = DUPLICATE_TOL) -> list[int]:
  """The `num_groups` most frequently selected experts, skipping exact duplicates of an
  already chosen one while enough other candidates remain; ascending index order."""
  order = [int(e) for e in np.argsort(-np.asarray(frequency, np.float64), kind="stable")]
  chosen: list[int] = []
  skipped: list[int] = []
  for e in order:
    if len(chosen) == num_groups:
      break
    if any(similarity[e, d] >= 1.0 - duplicate_tol for d in chosen):
      skipped.append(e)
    else:
      chosen.append(e)
  chosen += skipped[:num_groups - len(chosen)]
  return sorted(chosen)


def mc_smoe_groups(frequency: np.ndarray, similarity: np.ndarray, num_groups: int,
                   duplicate_tol: float = DUPLICATE_TOL) -> list[list[int]]:
  """A partition of range(E) into `num_groups` groups, one per dominant expert."""
  e = len(frequency)
  if not 1 <= num_groups <= e:
    raise config_error("num_experts", num_groups, f"must be an int in [1, {e}] (the number "
                       "of experts after merging)")
  dominant = dominant_experts(frequency, similarity, num_groups, duplicate_tol)
  groups = {d: [d] for d in dominant}
  for x in range(e):
    if x not in groups:
      best = max(dominant, key=lambda d: (similarity[x, d], -d))
      groups[best].append(x)
  return [sorted(groups[d]) for d in dominant]


def merged_config(config, num_experts: int, top_k: int | None = None):
  """A copy of the config with num_experts = E' and top_k (default min(top_k, E' + N))."""
  new = copy.deepcopy(config)
  with new.unlocked():
    moe = new.model.moe
    moe.num_experts = num_experts
    limit = num_experts + moe.get("num_null_experts", 0)
    moe.top_k = min(moe.top_k, limit) if top_k is None else top_k
  return new


def merge_model(config, model_cfg: ModelConfig, params, sums_per_layer: dict[int, dict],
          num_experts: int, top_k: int | None = None,
          duplicate_tol: float = DUPLICATE_TOL):
  """(new config, merged params, {layer: groups}, {layer: frequency}) by MC-SMoE."""
  groups, frequency = {}, {}
  for i in model_cfg.moe_layers:
    sums = sums_per_layer[i]
    frequency[i] = np.asarray(sums["selected"], np.float64)
    similarity = router_logit_similarity(sums["logit_gram"])
    groups[i] = mc_smoe_groups(frequency[i], similarity, num_experts, duplicate_tol)
  merged = merge_experts(params, model_cfg, groups, frequency)
  return merged_config(config, num_experts, top_k), merged, groups, frequency
