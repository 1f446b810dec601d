"""Sparse upcycling (Komatsuzaki et al., 2023): a dense checkpoint -> an MoE one.

Upcycling turns a dense checkpoint into an MoE one: every FFN that becomes an MoE layer
is copied into all E experts, W_e = W_dense for e = 1..E, and a fresh router is drawn.
If the combine weights of a token sum to one (router_order='topk_softmax', no dropped
tokens: dropless=True), then sum_e g_e FFN_e(x) = FFN_dense(x), so the upcycled model at
step 0 computes exactly the dense model's function. Everything else is copied verbatim.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np
from flax import traverse_util

from moejax.convert.safetensors_io import ConversionError


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def upcycle_params(
  dense_params, moe_model_cfg, abstract_moe_params, rng: jax.Array, router_stddev: float = 0.02
) -> dict:
  """Dense params -> MoE params shaped like `abstract_moe_params`.

  Args:
    dense_params: params of a dense Transformer (moe_every=0) with d_ff == expert_d_ff.
    moe_model_cfg: the target ModelConfig (same dims, MoE layers chosen by moe_every).
    abstract_moe_params: the target tree of shapes (``jax.eval_shape(model.init, ...)``).
    rng: key for the fresh router kernels ~ N(0, router_stddev^2).
  """
  moe = moe_model_cfg.moe
  if moe.num_shared_experts or moe.num_null_experts:
    raise ConversionError(
      "upcycling copies one FFN into routed experts only; set "
      "model.moe.num_shared_experts=0 and num_null_experts=0"
    )
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
          f"{tuple(like.shape[1:])}: model.moe.expert_d_ff must equal the dense model.d_ff"
        )
      out[path] = np.broadcast_to(np.asarray(source), like.shape).astype(like.dtype)
      continue
    if path not in dense:
      raise ConversionError(f"dense checkpoint has no parameter {path}")
    if tuple(dense[path].shape) != tuple(like.shape):
      raise ConversionError(
        f"parameter {path} has shape {tuple(dense[path].shape)} in the "
        f"dense checkpoint but {tuple(like.shape)} in the MoE model"
      )
    out[path] = np.asarray(dense[path]).astype(like.dtype)
  return traverse_util.unflatten_dict(out, sep="/")
