"""Expert analysis and compression: routing statistics, super experts, pruning, merging.

  collect    run a model over batches; per-MoE-layer routing and expert-activation sums
  stats      the per-layer report (load, entropy, drops, co-activation, super experts)
  plots      PNG plots of a report (matplotlib Agg)
  prune      EASY-EP / PreMoe expert scores and top-R pruning
  merge      MC-SMoE grouping by router-logit similarity and frequency-weighted merging
  workflows  the same on run workdirs (what ``tools/expert_tools.py`` calls)
"""

from moejax.analysis.collect import (accumulate, collect_sums, layer_sums, moe_layer_inputs,
                                     split_batches)
from moejax.analysis.merge import (dominant_experts, mc_smoe_groups, merge_model, merged_config,
                                   router_logit_similarity)
from moejax.analysis.prune import (SCORERS, easy_ep_scores, premoe_scores, prune_ffn,
                                   prune_model, prune_params, pruned_config, top_experts)
from moejax.analysis.stats import build_report, layer_report, super_experts

__all__ = [
    "SCORERS", "accumulate", "build_report", "collect_sums", "dominant_experts",
    "easy_ep_scores", "layer_report", "layer_sums", "mc_smoe_groups", "merge_model",
    "merged_config", "moe_layer_inputs", "premoe_scores", "prune_ffn", "prune_model",
    "prune_params", "pruned_config", "router_logit_similarity", "split_batches",
    "super_experts", "top_experts",
]
