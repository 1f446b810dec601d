"""Expert merging: E experts -> E' groups, each the frequency-weighted average of its group.

  W_g = sum_{e in g} a_e W_e / sum_{e in g} a_e   (wi_gate, wi_up, wo and the router column)

a_e is the expert's selection frequency (uniform when not measured). Groups are contiguous
index ranges or MC-SMoE's (Li et al., 2024, "Merge, Then Compress: Demystify Efficient SMoE
with Hints from Its Routing Policy"): the E' most selected experts are dominant and every
other expert joins the dominant one with the most similar (cosine) router-logit vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import numpy as np

from moejax.config import ExperimentConfig, ModelConfig
from moejax.convert.safetensors_io import ConversionError
from moejax.errors import config_error

EXPERT_PARAMS = ("wi_gate", "wi_up", "wo")
METHODS = ("mc_smoe", "contiguous")

DUPLICATE_TOL = 1e-6


def router_logit_similarity(logit_gram: np.ndarray) -> np.ndarray:
  """Cosine similarity [E, E] of the experts' router-logit vectors from their Gram matrix."""
  gram = np.asarray(logit_gram, np.float64)
  norm = np.sqrt(np.maximum(np.diag(gram), 1e-30))
  return np.clip(gram / norm[:, None] / norm[None, :], -1.0, 1.0)


def dominant_experts(
  frequency: np.ndarray,
  similarity: np.ndarray,
  num_groups: int,
  duplicate_tol: float = DUPLICATE_TOL,
) -> list[int]:
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
  chosen += skipped[: num_groups - len(chosen)]
  return sorted(chosen)


def mc_smoe_groups(
  frequency: np.ndarray,
  similarity: np.ndarray,
  num_groups: int,
  duplicate_tol: float = DUPLICATE_TOL,
) -> list[list[int]]:
  """A partition of range(E) into `num_groups` groups, one per dominant expert."""
  e = len(frequency)
  if not 1 <= num_groups <= e:
    raise config_error(
      "num_experts", num_groups, f"must be an int in [1, {e}] (the number of experts after merging)"
    )
  dominant = dominant_experts(frequency, similarity, num_groups, duplicate_tol)
  groups = {d: [d] for d in dominant}
  for x in range(e):
    if x not in groups:
      best = max(dominant, key=lambda d: (similarity[x, d], -d))
      groups[best].append(x)
  return [sorted(groups[d]) for d in dominant]


def merged_config(
  config: ExperimentConfig, num_experts: int, top_k: int | None = None
) -> ExperimentConfig:
  """The config with num_experts = E' and top_k (default min(top_k, E' + N))."""
  moe = config.model.moe
  limit = num_experts + moe.num_null_experts
  return config.replace_fields(
    {
      "model.moe.num_experts": num_experts,
      "model.moe.top_k": min(moe.top_k, limit) if top_k is None else top_k,
    }
  )


def merge_model(
  config: ExperimentConfig,
  model_cfg: ModelConfig,
  params,
  sums_per_layer: dict[int, dict] | None,
  num_experts: int,
  top_k: int | None = None,
  method: str = "mc_smoe",
  duplicate_tol: float = DUPLICATE_TOL,
):
  """(new config, merged params, {layer: groups}, {layer: frequency}).

  method 'mc_smoe' groups by router-logit similarity around the most selected experts;
  'contiguous' groups index ranges [0..m-1], [m..2m-1], ... (E' must divide E). Both merge
  weighted by the selection frequency in `sums_per_layer` (uniform when it is None, which
  only 'contiguous' allows).
  """
  if method not in METHODS:
    raise config_error("method", method, f"allowed: {list(METHODS)}")
  if sums_per_layer is None and method == "mc_smoe":
    raise config_error("batches", 0, "mc_smoe needs routing statistics: batches >= 1")
  groups, frequency = {}, {}
  for i in model_cfg.moe_layers:
    sums = None if sums_per_layer is None else sums_per_layer[i]
    if sums is not None:
      frequency[i] = np.asarray(sums["selected"], np.float64)
    if method == "contiguous":
      groups[i] = contiguous_groups(model_cfg.moe.num_experts, num_experts)
    else:
      similarity = router_logit_similarity(sums["logit_gram"])
      groups[i] = mc_smoe_groups(frequency[i], similarity, num_experts, duplicate_tol)
  merged = merge_experts(params, model_cfg, groups, frequency or None)
  return merged_config(config, num_experts, top_k), merged, groups, frequency


def merge_ffn_experts(
  ffn: dict, groups: Sequence[Sequence[int]], frequency: np.ndarray | None = None
) -> dict:
  """Merges one MoE layer's params {'router' [d,E(+N)], 'wi_gate', 'wi_up', 'wo' [E,..]}.

  groups: a partition of range(E) into E' lists; expert g of the result merges groups[g].
  frequency: a_e >= 0, [E] (how often each expert was selected); uniform when None.
  Null-expert router columns (beyond E) and any other entries (shared experts) are kept.
  """
  num_experts = ffn["wi_gate"].shape[0]
  flat_groups = sorted(e for g in groups for e in g)
  if flat_groups != list(range(num_experts)):
    raise ConversionError(f"expert groups {groups} must partition range({num_experts})")
  a = np.ones(num_experts) if frequency is None else np.asarray(frequency, np.float64)
  if a.shape != (num_experts,) or np.any(a < 0):
    raise ConversionError(f"expert frequency must be {num_experts} non-negative numbers")
  merged = dict(ffn)
  weights = []
  for g in groups:
    w = a[list(g)]
    weights.append(w / w.sum() if w.sum() > 0 else np.full(len(g), 1.0 / len(g)))
  for name in EXPERT_PARAMS:
    stacked = np.asarray(ffn[name])
    merged[name] = np.stack(
      [
        np.tensordot(w, stacked[list(g)], axes=1).astype(stacked.dtype)
        for g, w in zip(groups, weights)
      ]
    )
  router = np.asarray(ffn["router"])
  columns = [(router[:, list(g)] @ w).astype(router.dtype) for g, w in zip(groups, weights)]
  merged["router"] = np.concatenate([np.stack(columns, axis=1), router[:, num_experts:]], axis=1)
  return merged


def merge_experts(
  params,
  model_cfg,
  groups_per_layer: dict[int, Sequence[Sequence[int]]],
  frequency_per_layer: dict[int, np.ndarray] | None = None,
) -> dict:
  """Applies `merge_ffn_experts` to every MoE layer i listed in `groups_per_layer`."""
  params = flax.core.unfreeze(params)
  out = dict(params)
  for i, groups in groups_per_layer.items():
    if not model_cfg.is_moe_layer(i):
      raise ConversionError(f"layer {i} is not an MoE layer")
    layer = dict(out[f"layers_{i}"])
    freq = None if frequency_per_layer is None else frequency_per_layer.get(i)
    layer["ffn"] = merge_ffn_experts(layer["ffn"], groups, freq)
    out[f"layers_{i}"] = layer
  return out


def contiguous_groups(num_experts: int, num_target: int) -> list[list[int]]:
  """[[0..m-1], [m..2m-1], ...] with m = num_experts / num_target."""
  if num_target < 1 or num_experts % num_target:
    raise ConversionError(
      f"cannot merge {num_experts} experts into {num_target} equal "
      "groups; the target must divide the number of experts"
    )
  m = num_experts // num_target
  return [list(range(g * m, (g + 1) * m)) for g in range(num_target)]
