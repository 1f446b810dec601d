"""Routers: pure functions ``route(logits, cfg) -> Routing``, selected by name.

Registered names: 'topk', 'expert_choice', 'null_experts', 'shared_experts', 'top_p'.
"""

from moejax.routers import expert_choice, null_experts, shared_experts, top_p, topk  # noqa: F401  (registration)
from moejax.routers.base import (
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
