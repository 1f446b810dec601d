"""Rematerialisation policies by name (``model.remat_policy``; Chen et al., 2016).

What a block keeps from its forward pass for the backward (``jax.checkpoint_policies``):

  none      everything (no remat)
  full      nothing but its inputs: the backward re-runs the whole block forward,
            including the expert-parallel layer's two all_to_alls
  minimal   the outputs of the projections (matmuls without batch dimensions:
            q/k/v/o, dense FFN, router); attention scores and expert FFNs are recomputed
  save_a2a  only the tensors named ``DISPATCH_A2A`` / ``COMBINE_A2A`` (the all_to_all
            results tagged with ``checkpoint_name`` in ``moejax.layers.expert_parallel``),
            so the backward recomputes the local math but exchanges nothing again:
            4 instead of 6 all_to_alls per MoE layer and step.
"""

from __future__ import annotations

import flax.linen as nn
import jax

DISPATCH_A2A = "moe_dispatch_a2a"
COMBINE_A2A = "moe_combine_a2a"


def checkpoint_policy(name: str):
  """The ``jax.checkpoint`` policy of remat mode `name` (None saves nothing)."""
  policies = jax.checkpoint_policies
  if name == "full":
    return None
  if name == "minimal":
    return policies.dots_with_no_batch_dims_saveable
  if name == "save_a2a":
    return policies.save_only_these_names(DISPATCH_A2A, COMBINE_A2A)
  raise ValueError(f"no checkpoint policy for remat mode {name!r}")


def remat_module(module_cls, name: str, prevent_cse: bool = True):
  """`module_cls` wrapped in ``nn.remat`` with policy `name` ('none': unchanged).

  prevent_cse=False is safe (and faster) inside ``nn.scan``, where forward and backward
  are separate loops that XLA cannot merge.
  """
  if name == "none":
    return module_cls
  return nn.remat(module_cls, policy=checkpoint_policy(name), prevent_cse=prevent_cse)
