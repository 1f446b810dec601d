"""Expert analysis: routing statistics and super experts (compression is ``moejax.compress``).

collect    run a model over batches; per-MoE-layer routing and expert-activation sums
stats      the per-layer report (load, entropy, drops, co-activation, super experts)
plots      PNG plots of a report (matplotlib Agg)
workflows  the report on a run workdir (what ``moejax-experts stats`` calls)
"""

from moejax.analysis.collect import (
  accumulate,
  collect_sums,
  layer_sums,
  moe_layer_inputs,
  split_batches,
)
from moejax.analysis.stats import build_report, layer_report, super_experts

__all__ = [
  "accumulate",
  "build_report",
  "collect_sums",
  "layer_report",
  "layer_sums",
  "moe_layer_inputs",
  "split_batches",
  "super_experts",
]
