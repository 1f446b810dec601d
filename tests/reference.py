"""Naive numpy/Python references for routing and the MoE layer, used by the tests.

Everything here is written from the papers' definitions (see the docstrings of
``moejax.routers``) with plain loops and float64 numpy, independently of the jax code, so a
test comparing the two can fail if either is wrong. Nothing here imports moejax.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

NULL = "null"  # marker in choice lists; null experts never occupy a slot


def softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def logsumexp(z, axis=-1):
  z = np.asarray(z, np.float64)
  m = z.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def ranked(values) -> np.ndarray:
  """Indices sorted by descending value; ties go to the lower index (stable sort)."""
  return np.argsort(-np.asarray(values, np.float64), kind="stable")


def reference_capacity(router: str, s: int, e: int, k: int, cf: float, dropless: bool) -> int:
  """Exact rational arithmetic on cf as written (1.1 is 11/10, not the nearest double)."""
  cf = Fraction(repr(cf))
  if router == "expert_choice":
    return min(s, math.ceil(cf * s / e))
  if dropless:
    return s
  return min(s, math.ceil(cf * s * k / e))


def token_choices(logits_s: np.ndarray, router: str, k: int, order: str, p: float):
  """One token's choices before capacity: a list of (expert, weight) in rank order.

  Indices >= E denote null experts (kept in the list: they use up one of the k picks).
  """
  logits_s = np.asarray(logits_s, np.float64)
  probs = softmax(logits_s)
  idx = ranked(logits_s)
  if router == "top_p":
    chosen, mass = [], 0.0
    for r in idx[:k]:
      if mass >= p:
        break
      chosen.append(int(r))
      mass += probs[r]
    return [(r, probs[r]) for r in chosen]
  chosen = [int(r) for r in idx[:k]]
  if order == "topk_softmax":
    w = softmax(logits_s[chosen])
  else:
    w = probs[chosen]
  return list(zip(chosen, w))


def gshard_assign(choices, num_experts: int, capacity: int):
  """GShard capacity assignment with a plain loop.

  All tokens' 1st choices are placed before any 2nd choice; within one rank, earlier tokens
  first. Returns ({(expert, token): weight} of kept assignments, number of selected real
  assignments).
  """
  count = [0] * num_experts
  kept = {}
  n_selected = 0
  max_rank = max((len(c) for c in choices), default=0)
  for rank in range(max_rank):
    for s, ch in enumerate(choices):
      if rank >= len(ch):
        continue
      e, w = ch[rank]
      if e >= num_experts:  # null expert: no slot, not dropped
        continue
      n_selected += 1
      if count[e] < capacity:
        assert (e, s) not in kept
        kept[(e, s)] = float(w)
        count[e] += 1
  return kept, n_selected


def expert_choice_assign(logits_group: np.ndarray, capacity: int):
  """Each expert takes the `capacity` tokens with the highest softmax score for it."""
  probs = softmax(logits_group)  # [S, E]
  kept = {}
  for e in range(probs.shape[1]):
    for s in ranked(probs[:, e])[:capacity]:
      kept[(e, int(s))] = float(probs[s, e])
  return kept, len(kept)


def reference_routing(
  logits: np.ndarray,
  router: str,
  num_experts: int,
  k: int = 2,
  cf: float = 1.25,
  dropless: bool = False,
  order: str = "softmax_topk",
  p: float = 0.5,
):
  """Per group: (kept {(e, s): w}, selected real count, choices per token (None for EC))."""
  logits = np.asarray(logits, np.float64)
  g, s, _ = logits.shape
  c = reference_capacity(router, s, num_experts, k, cf, dropless)
  out = []
  for gi in range(g):
    if router == "expert_choice":
      kept, n_sel = expert_choice_assign(logits[gi], c)
      out.append((kept, n_sel, None))
      continue
    choices = [token_choices(logits[gi, si], router, k, order, p) for si in range(s)]
    kept, n_sel = gshard_assign(choices, num_experts, c)
    out.append((kept, n_sel, choices))
  return out


def silu(x):
  return x / (1.0 + np.exp(-x))


def gelu_tanh(x):  # jax.nn.gelu's default (approximate=True)
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACT = {"silu": silu, "gelu": gelu_tanh}


def gated_ffn_np(x, w_gate, w_up, w_down, activation: str):
  x = np.asarray(x, np.float64)
  h = ACT[activation](x @ np.asarray(w_gate, np.float64)) * (x @ np.asarray(w_up, np.float64))
  return h @ np.asarray(w_down, np.float64)


def moe_layer_reference(
  x,
  params,
  *,
  router,
  num_experts,
  k=2,
  cf=1.25,
  dropless=False,
  order="softmax_topk",
  p=0.5,
  activation="silu",
  group_size=None,
):
  """Per-token loop: y_t = sum_{(e, w) kept for t} w * FFN_e(x_t) [+ shared FFN(x_t)].

  x: [B, L, d]; params: dict with 'router' [d, R], 'wi_gate'/'wi_up' [E, d, f], 'wo' [E, f, d]
  and optionally 'shared' {'wi_gate', 'wi_up', 'wo'}.
  """
  x = np.asarray(x, np.float64)
  b, l, d = x.shape
  s = l if group_size is None else group_size
  tokens = x.reshape(-1, d)
  groups = tokens.reshape(-1, s, d)
  logits = groups @ np.asarray(params["router"], np.float64)  # [G, S, R]
  routing = reference_routing(logits, router, num_experts, k, cf, dropless, order, p)
  y = np.zeros_like(groups)
  for gi, (kept, _, _) in enumerate(routing):
    for si in range(s):
      for e in range(num_experts):
        if (e, si) in kept:
          y[gi, si] += kept[(e, si)] * gated_ffn_np(
            groups[gi, si], params["wi_gate"][e], params["wi_up"][e], params["wo"][e], activation
          )
  y = y.reshape(b, l, d)
  if "shared" in params:
    sh = params["shared"]
    y = y + gated_ffn_np(x, sh["wi_gate"], sh["wi_up"], sh["wo"], activation)
  return y, routing
