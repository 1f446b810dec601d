"""Model compression and growth on checkpoints: expert pruning, expert merging, upcycling.

prune      EASY-EP / PreMoe expert scores and top-R pruning
merge      frequency-weighted merging of expert groups (MC-SMoE or contiguous groups)
upcycle    dense -> MoE by copying the FFN into every expert (sparse upcycling)
workflows  the same on run workdirs (what ``moejax-experts`` / ``moejax-convert`` call)
"""

from moejax.compress.merge import (
  METHODS,
  contiguous_groups,
  dominant_experts,
  mc_smoe_groups,
  merge_experts,
  merge_ffn_experts,
  merge_model,
  merged_config,
  router_logit_similarity,
)
from moejax.compress.prune import (
  SCORERS,
  easy_ep_scores,
  premoe_scores,
  prune_ffn,
  prune_model,
  prune_params,
  pruned_config,
  top_experts,
)
from moejax.compress.upcycle import upcycle_params

__all__ = [
  "METHODS",
  "SCORERS",
  "contiguous_groups",
  "dominant_experts",
  "easy_ep_scores",
  "mc_smoe_groups",
  "merge_experts",
  "merge_ffn_experts",
  "merge_model",
  "merged_config",
  "premoe_scores",
  "prune_ffn",
  "prune_model",
  "prune_params",
  "pruned_config",
  "router_logit_similarity",
  "top_experts",
  "upcycle_params",
]
