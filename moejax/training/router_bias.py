"""DeepSeek-V3's auxiliary-loss-free balancing state: the ``router_bias`` leaves.

Each biased MoE layer (``moejax.routers.BIASED_ROUTERS``) holds ``ffn/router_bias`` f32[E]
beside its parameters: checkpointed, resharded and exported with them, replicated
(logical axis 'router'), but never moved by the optimizer. After every train step the
step replaces the optimizer's value by the sign rule on that step's selection load
(``moejax.routers.update_router_bias``). Under ``scan_layers`` the leaf is
``scanned_layers/block_j/ffn/router_bias`` [U, E], unit u being layer start + u*unit + j.
"""

from __future__ import annotations

import flax
import jax.numpy as jnp
from flax import traverse_util

from moejax.models.layer_stack import SCAN_KEY, scan_plan
from moejax.routers import BIASED_ROUTERS, update_router_bias

LEAF = "router_bias"


def uses_router_bias(model_cfg) -> bool:
  moe = getattr(model_cfg, "moe", None)
  return moe is not None and moe.router in BIASED_ROUTERS


def updated_router_biases(new_params, old_params, metrics: dict, model_cfg):
  """`new_params` with every ``router_bias`` leaf set to the sign-rule update of its value
  in `old_params`, from ``metrics['layers_i']['selected_load']`` f32[E] of this step."""
  if not uses_router_bias(model_cfg):
    return new_params
  rate = model_cfg.moe.bias_update_rate
  plan = scan_plan(model_cfg)
  flat_new = traverse_util.flatten_dict(flax.core.unfreeze(new_params))
  flat_old = traverse_util.flatten_dict(flax.core.unfreeze(old_params))
  for path, old in flat_old.items():
    if path[-1] != LEAF:
      continue
    if path[0] == SCAN_KEY:  # ('scanned_layers', 'block_j', 'ffn', 'router_bias'): [U, E]
      j = int(path[1].removeprefix("block_"))
      layers = [plan.layer(u, j) for u in range(old.shape[0])]
      load = jnp.stack([metrics[f"layers_{i}"]["selected_load"] for i in layers])
    else:  # ('layers_i', 'ffn', 'router_bias'): [E]
      load = metrics[path[0]]["selected_load"]
    flat_new[path] = update_router_bias(old, load, rate).astype(old.dtype)
  return traverse_util.unflatten_dict(flat_new)
