"""Routers: pure functions ``route(logits, cfg) -> Routing``, selected by name.

Registered names: 'topk', 'expert_choice', 'null_experts', 'shared_experts', 'top_p',
'rank_k' (SCMoE's weak activation), 'multigate', 'pregate', 'deepseek_v3'.
"""

from moejax.routers import (  # noqa: F401  (registration)
  deepseek_v3,
  expert_choice,
  multigate,
  null_experts,
  pregate,
  rank_k,
  shared_experts,
  top_p,
  topk,
)
from moejax.routers.base import (
  BIASED_ROUTERS,
  ROUTERS,
  Routing,
  assign_slots,
  assignment_metrics,
  get_router,
  load_balance_loss,
  register_router,
  route,
  select_top_k,
  z_loss,
)
from moejax.routers.deepseek_v3 import update_router_bias
