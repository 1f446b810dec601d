"""Sparse upcycling (Komatsuzaki et al., 2023) and router-weighted expert merging.

Upcycling turns a dense checkpoint into an MoE one: every FFN that becomes an MoE layer
is copied into all E experts, W_e = W_dense for e = 1..E, and a fresh router is drawn.
If the combine weights of a token sum to one (router_order='topk_softmax', no dropped
tokens: dropless=True), then sum_e g_e FFN_e(x) = FFN_dense(x), so the upcycled model at
step 0 computes exactly the dense model's function. Everything else is copied verbatim.

Merging maps E experts to E' groups: expert g of the result is the frequency-weighted
average of its group,  W_g = sum_{e in g} a_e W_e / sum_{e in g} a_e  (for each of
wi_gate, wi_up, wo), and its router column is the same weighted average of the group's
router columns (MC-SMoE, Li et al., 2024, merge by activation frequency a_e). A group of
identical experts (identical weights and router columns) merges into that same expert.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import numpy as np
from flax import traverse_util

from moejax.convert.safetensors_io import ConversionError

EXPERT_PARAMS = ("wi_gate", "wi_up", "wo")


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def upcycle_params(dense_params, moe_model_cfg, abstract_moe_params,
                   rng: jax.Array, router_stddev: float = 0.02) -> dict:
  """Dense params -> MoE params shaped like `abstract_moe_params`.

  Args:
    dense_params: params of a dense Transformer (moe_every=0) with d_ff == expert_d_ff.
    moe_model_cfg: the target ModelConfig (same dims, MoE layers chosen by moe_every).
    abstract_moe_params: the target tree of shapes (``jax.eval_shape(model.init, ...)``).
    rng: key for the fresh router kernels ~ N(0, router_stddev^2).
  """
  moe = moe_model_cfg.moe
  if moe.num_shared_experts or moe.num_null_experts:
    raise ConversionError("upcycling copies one FFN into routed experts only; set "
                          "model.moe.num_shared_experts=0 and num_null_experts=0")
  dense = _flat(dense_params)
  target = _flat(abstract_moe_params)
  out = {}
  for path, like in target.items():
    layer, _, rest = path.partition("/")
    if rest.startswith("ffn/") and moe_model_cfg.is_moe_layer(int(layer.split("_")[1])):
      name = rest.split("/", 1)[1]
      if name == "router":
        rng, key = jax.random.split(rng)
        out[path] = np.asarray(router_stddev * jax.random.normal(key, like.shape, like.dtype))
        continue
      source = dense.get(f"{layer}/ffn/{name}")
      if source is None:
        raise ConversionError(f"dense checkpoint has no {layer}/ffn/{name} to upcycle")
      if tuple(source.shape) != tuple(like.shape[1:]):
        raise ConversionError(
            f"dense {layer}/ffn/{name} has shape {tuple(source.shape)} but each expert needs "
            f"{tuple(like.shape[1:])}: model.moe.expert_d_ff must equal the dense model.d_ff")
      out[path] = np.broadcast_to(np.asarray(source), like.shape).astype(like.dtype)
      continue
    if path not in dense:
      raise ConversionError(f"dense checkpoint has no parameter {path}")
    if tuple(dense[path].shape) != tuple(like.shape):
      raise ConversionError(f"parameter {path} has shape {tuple(dense[path].shape)} in the "
                            f"dense checkpoint but {tuple(like.shape)} in the MoE model")
    out[path] = np.asarray(dense[path]).astype(like.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def merge_ffn_experts(ffn: dict, groups: Sequence[Sequence[int]],
                      frequency: np.ndarray | None = None) -> dict:
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
    merged[name] = np.stack([np.tensordot(w, stacked[list(g)], axes=1).astype(stacked.dtype)
                             for g, w in zip(groups, weights)])
  router = np.asarray(ffn["router"])
  columns = [(router[:, list(g)] @ w).astype(router.dtype) for g, w in zip(groups, weights)]
  merged["router"] = np.concatenate([np.stack(columns, axis=1), router[:, num_experts:]],
                                    axis=1)
  return merged


def merge_experts(params, model_cfg, groups_per_layer: dict[int, Sequence[Sequence[int]]],
                  frequency_per_layer: dict[int, np.ndarray] | None = None) -> dict:
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
    raise ConversionError(f"cannot merge {num_experts} experts into {num_target} equal "
                          "groups; the target must divide the number of experts")
  m = num_experts // num_target
  return [list(range(g * m, (g + 1) * m)) for g in range(num_target)]
