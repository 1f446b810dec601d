"""The frozen, validated configuration of one MoE layer.

Configs are written as ``ml_collections.ConfigDict`` (see ``configs/``) and turned into
this hashable dataclass with :meth:`MoEConfig.from_config`, so Flax modules and jitted
functions can hold it as a static attribute.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

from moejax.fields import check, is_bool, is_int, is_number, section_from_config

ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
ACTIVATIONS = ("silu", "gelu")
EXPERT_IMPLS = ("auto", "ragged_dot", "blocked", "capacity")
EP_EXCHANGES = ("auto", "ragged_all_to_all", "padded_all_to_all")
VARIABLE_K_ROUTERS = ("null_experts", "top_p")
COMPRESSED_ROUTERS = ("topk", "shared_experts", "top_p", "multigate", "pregate")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Hyper-parameters of one MoE layer and its router.

  Attributes:
    num_experts: E, the number of routed (real) experts.
    expert_d_ff: hidden width of one expert's gated FFN.
    router: registered router name (see ``moejax.routers.ROUTERS``).
    top_k: experts per token for token-choice routers; the cap ``max_k`` for ``top_p``.
      Unused by ``expert_choice``.
    capacity_factor: cf > 0. token-choice: C = min(S, ceil(cf * S * k / E)) slots per
      expert and group of S tokens (GShard/Switch). expert_choice: C = min(S,
      ceil(cf * S / E)), so cf is the mean number of experts per token (Zhou et al., 2022).
      Computed exactly on the decimal value of cf (see ``capacity``), so 1 <= C <= S.
    dropless: token-choice routers only; C = S so no token is ever dropped.
    router_order: 'softmax_topk' (softmax over all experts, keep the top-k probabilities
      as they are; Switch/GShard/DeepSeek) or 'topk_softmax' (softmax over the top-k
      logits only, i.e. renormalised top-k weights; Mixtral).
    num_null_experts: AdaMoE null experts (identity-to-zero, no FLOPs), router `null_experts`.
    num_shared_experts: DeepSeekMoE always-on shared experts, each `expert_d_ff` wide.
    top_p: cumulative-probability threshold of the `top_p` router (Huang et al., 2024).
    activation: 'silu' (SwiGLU experts) or 'gelu' (GeGLU experts).
    group_size: tokens per routing group S; None means one group per sequence.
    load_balance_weight: weight of the Switch load-balancing loss.
    z_loss_weight: weight of the ST-MoE router z-loss.
    dynamic_loss_weight: weight of the top-p router's entropy loss (Huang et al., 2024).
    routed_scaling_factor: router='shared_experts' or 'deepseek_v3' only; multiplies the
      routed experts' combine weights (DeepSeek's ``routed_scaling_factor``; 1.0 for
      V2-Lite, 16.0 for V2, 2.5 for V3). Must be a finite number > 0, and 1.0 otherwise.
    shared_expert_d_ff: width of the shared FFN; None: num_shared_experts * expert_d_ff
      (DeepSeekMoE). Qwen2-MoE's ``shared_expert_intermediate_size``.
    shared_expert_gate: scale the shared FFN's output by sigmoid(x . w), a learned
      ``shared_gate`` [d, 1] (Qwen2-MoE's ``shared_expert_gate``).
    n_group, topk_group: group-limited routing (router 'shared_experts': DeepSeek-V2
      ``group_limited_greedy``; 'deepseek_v3'): the E experts form n_group groups and a
      token picks its top_k among its topk_group best groups. n_group = 1: no limit.
    norm_topk_prob: router='deepseek_v3': divide the chosen sigmoid scores by their sum.
    bias_update_rate: router='deepseek_v3': gamma of the aux-loss-free bias update
      b_i += gamma * sign(mean load - load_i) after each train step (0: bias frozen).
    expert_impl: how a dropless token-choice layer runs its experts (capacity configs
      always use slot buffers). 'ragged_dot': assignments sorted by expert, one
      ``jax.lax.ragged_dot`` grouped matmul; 'blocked': sorted rows padded per expert to a
      multiple of `expert_block_size`, one batched matmul over blocks (fast on CPU, where
      ragged_dot has no native kernel); 'capacity': the C = S slot buffers (E/k times the
      FLOPs; kept as the reference); 'auto': ragged_dot on tpu, blocked on cpu and gpu
      (on an H200 ragged_dot's backward ran 2.9-11x slower than capacity 1.25 and, at 32k
      tokens, asked for 174 GiB; benchmarks/README.md).
    expert_block_size: rows per block of the 'blocked' impl; None picks a power of two in
      [8, 256] whose padding is at most 1/4 of the rows.
    dropless_windows: the sorted dropless layer's fast path, factors c_1 < c_2 < ...: every
      expert's first L_1 = ceil(c_1 * A / E) rows (A assignments on the device) run as
      dense per-expert matmuls; rows past L_1 (a load above c_1 times the mean) run in a
      ``lax.while_loop``, one block of B = L_2 - L_1 rows of one expert per step (L_1 / 4
      with one factor), zero steps when every load fits; always exact. Factors past c_2
      change nothing. () disables the fast path: `expert_impl` runs alone. Factors below 1
      serve routers whose number of real experts per token varies (null experts, top-p,
      compressed experts); the others always have a load >= A / E, so
      ``resolved_dropless_windows`` drops them. The default's (1, 1.0625) computes exactly
      the A rows of a balanced load; each overflowing expert adds its overflow rounded up to
      A / (16 E) rows.
    ep_exchange: dropless expert-parallel exchange. 'ragged_all_to_all': exactly the routed
      rows (gpu/tpu only; XLA:CPU rejects the op); 'padded_all_to_all': a fixed
      [devices, rows_per_device] buffer per device (the CPU fallback); 'auto' picks by backend.
    ragged_buffer_factor, ragged_buffer_min_rows: the static bound on rows one device sends
      to (receives from) one other device in the dropless expert-parallel exchange:
      max(ragged_buffer_min_rows, ceil(factor * A / P)) capped at A, for A = local
      (token, expert) assignments and P expert-parallel devices. Assignments past the bound
      are dropped and counted in the 'dropped_fraction' metric (factor >= P never drops).
    num_compressed_experts: Compressed Experts (He et al., 2025): router columns
      [E, E + num_compressed_experts) stand for removed experts; a pick of one adds
      g * c_j (its vector ``compressed[j]`` [d]) instead of an FFN output. Token-choice
      routers except null_experts.
    num_tasks: T gates of router='multigate' (MMoE, Ma et al., 2018): the gate of each
      token's task (``task_id`` in the batch) scores the experts.
    task_categories: HoME (Wang et al., 2024): the category of each of the T tasks (ints
      in [0, K)); empty means one category.
    num_category_experts, num_task_experts: HoME's expert hierarchy, per category / per
      task, laid out after the experts shared by all tasks (``routers.multigate``).
    pregate_d_hidden: hidden width of router='pregate''s separate router network
      (Read-ME, Cai et al., 2024), which routes every MoE layer from the embeddings.
    config_path: dotted path used in error messages; not part of equality.
  """

  num_experts: int = 8
  expert_d_ff: int = 256
  router: str = "topk"
  top_k: int = 2
  capacity_factor: float = 1.25
  dropless: bool = False
  router_order: str = "softmax_topk"
  num_null_experts: int = 0
  num_shared_experts: int = 0
  top_p: float = 0.5
  activation: str = "silu"
  group_size: int | None = None
  load_balance_weight: float = 0.01
  z_loss_weight: float = 0.001
  dynamic_loss_weight: float = 0.0
  routed_scaling_factor: float = 1.0
  shared_expert_d_ff: int | None = None
  shared_expert_gate: bool = False
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  bias_update_rate: float = 0.0
  expert_impl: str = "auto"
  expert_block_size: int | None = None
  dropless_windows: tuple = (0.5, 0.5625, 1.0, 1.0625)
  ep_exchange: str = "auto"
  ragged_buffer_factor: float = 1.25
  ragged_buffer_min_rows: int = 128
  num_compressed_experts: int = 0
  num_tasks: int = 0
  task_categories: tuple = ()
  num_category_experts: int = 0
  num_task_experts: int = 0
  pregate_d_hidden: int = 64
  config_path: str = dataclasses.field(default="moe", compare=False, hash=False, repr=False)

  def __post_init__(self):
    for name in ("task_categories", "dropless_windows"):
      if isinstance(getattr(self, name), list):  # config.json round trip
        object.__setattr__(self, name, tuple(getattr(self, name)))
    validate_moe_config(self)

  @classmethod
  def from_config(cls, cfg: Any, path: str = "model.moe") -> "MoEConfig":
    """Builds a validated MoEConfig from a ConfigDict/mapping; unknown keys are errors."""
    return section_from_config(cls, cfg, path)

  @property
  def num_router_logits(self) -> int:
    """Width of the gating projection: real, compressed and null experts."""
    return self.num_experts + self.num_compressed_experts + self.num_null_experts

  @property
  def is_token_choice(self) -> bool:
    return self.router != "expert_choice"

  @property
  def sorted_dropless(self) -> bool:
    """True when the layer runs its experts on expert-sorted assignments (no slots)."""
    return self.dropless and self.is_token_choice and self.resolved_expert_impl() != "capacity"

  @property
  def variable_k(self) -> bool:
    """True when some (token, choice) picks run no expert FFN: null experts, top-p's
    unselected choices, compressed-expert columns."""
    return self.router in VARIABLE_K_ROUTERS or self.num_compressed_experts > 0

  def resolved_dropless_windows(self) -> tuple:
    """dropless_windows without the factors < 1 for fixed-k routers: their A assignments
    all run, so the largest of E loads is >= A / E and a window below the mean never
    holds it (it would only be compiled)."""
    if self.variable_k:
      return self.dropless_windows
    return tuple(c for c in self.dropless_windows if c >= 1)

  def resolved_expert_impl(self) -> str:
    """expert_impl with 'auto' resolved by ``jax.default_backend()``."""
    if self.expert_impl != "auto":
      return self.expert_impl
    import jax

    return "ragged_dot" if jax.default_backend() == "tpu" else "blocked"

  def resolved_ep_exchange(self) -> str:
    """ep_exchange with 'auto' resolved by ``jax.default_backend()``."""
    if self.ep_exchange != "auto":
      return self.ep_exchange
    import jax

    return "padded_all_to_all" if jax.default_backend() == "cpu" else "ragged_all_to_all"

  def capacity(self, group_size: int) -> int:
    """Slots C per expert for a routing group of `group_size` tokens, 1 <= C <= S.

    C = min(S, ceil(cf * S * k / E)) (k = 1 for expert_choice; C = S when dropless),
    evaluated in exact rational arithmetic on cf's shortest decimal form: float products
    would round ceil(0.7 * 10) up to 8, overflow to inf for huge cf, or underflow to
    C = 0 for subnormal cf.
    """
    s = group_size
    if self.dropless and self.router != "expert_choice":
      return s  # a token visits an expert at most once, so S slots never overflow
    k = 1 if self.router == "expert_choice" else self.top_k
    cf = Fraction(repr(float(self.capacity_factor)))
    return min(s, math.ceil(cf * s * k / self.num_experts))


_check = check
_is_int = is_int
_is_bool = is_bool
_is_finite_number = is_number


def validate_moe_config(cfg: MoEConfig) -> None:
  """Raises ConfigError naming the first invalid field of `cfg`."""
  from moejax.routers import ROUTERS  # local import: routers import this module

  _check(cfg, "router", cfg.router in ROUTERS, f"allowed routers are {sorted(ROUTERS)}")
  _check(
    cfg, "num_experts", _is_int(cfg.num_experts) and cfg.num_experts >= 1, "must be an int >= 1"
  )
  _check(
    cfg, "expert_d_ff", _is_int(cfg.expert_d_ff) and cfg.expert_d_ff >= 1, "must be an int >= 1"
  )
  _check(
    cfg,
    "num_null_experts",
    _is_int(cfg.num_null_experts) and cfg.num_null_experts >= 0,
    "must be an int >= 0",
  )
  _check(
    cfg,
    "num_shared_experts",
    _is_int(cfg.num_shared_experts) and cfg.num_shared_experts >= 0,
    "must be an int >= 0",
  )
  # Before top_k, whose bound counts the null experts.
  _check(
    cfg,
    "num_null_experts",
    cfg.router == "null_experts" or cfg.num_null_experts == 0,
    "null experts are only used by router='null_experts'; set it to 0",
  )
  _check(
    cfg,
    "num_null_experts",
    cfg.router != "null_experts" or cfg.num_null_experts >= 1,
    "router='null_experts' needs num_null_experts >= 1",
  )
  _check(
    cfg,
    "num_compressed_experts",
    _is_int(cfg.num_compressed_experts) and cfg.num_compressed_experts >= 0,
    "must be an int >= 0",
  )
  _check(
    cfg,
    "num_compressed_experts",
    cfg.num_compressed_experts == 0 or cfg.router in COMPRESSED_ROUTERS,
    f"compressed experts need a token-choice router in {COMPRESSED_ROUTERS}",
  )
  total = cfg.num_router_logits
  plus = "num_compressed_experts + " if cfg.num_compressed_experts else ""
  _check(
    cfg,
    "top_k",
    _is_int(cfg.top_k) and 1 <= cfg.top_k <= total,
    f"must be an int in [1, num_experts + {plus}num_null_experts = {total}]",
  )
  validate_methods(cfg)
  _check(
    cfg,
    "capacity_factor",
    _is_finite_number(cfg.capacity_factor) and cfg.capacity_factor > 0,
    "must be a finite number > 0",
  )
  _check(cfg, "router_order", cfg.router_order in ROUTER_ORDERS, f"allowed: {ROUTER_ORDERS}")
  _check(cfg, "activation", cfg.activation in ACTIVATIONS, f"allowed: {ACTIVATIONS}")
  _check(
    cfg, "top_p", _is_finite_number(cfg.top_p) and 0 < cfg.top_p <= 1, "must be a number in (0, 1]"
  )
  _check(
    cfg,
    "group_size",
    cfg.group_size is None or (_is_int(cfg.group_size) and cfg.group_size >= 1),
    "must be None or an int >= 1",
  )
  for name in ("load_balance_weight", "z_loss_weight", "dynamic_loss_weight"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_finite_number(v) and v >= 0, "must be a finite number >= 0")
  _check(
    cfg,
    "num_shared_experts",
    cfg.router != "shared_experts" or cfg.num_shared_experts >= 1,
    "router='shared_experts' needs num_shared_experts >= 1 (DeepSeekMoE)",
  )
  _check(
    cfg,
    "routed_scaling_factor",
    _is_finite_number(cfg.routed_scaling_factor) and cfg.routed_scaling_factor > 0,
    "must be a finite number > 0",
  )
  _check(
    cfg,
    "routed_scaling_factor",
    cfg.router in ("shared_experts", "rank_k", "deepseek_v3") or cfg.routed_scaling_factor == 1.0,
    "only router='shared_experts' (and its rank_k weak routing) or router='deepseek_v3' "
    "scales its routed weights; set it to 1.0",
  )
  _validate_deepseek_fields(cfg)
  _check(cfg, "expert_impl", cfg.expert_impl in EXPERT_IMPLS, f"allowed: {EXPERT_IMPLS}")
  _check(
    cfg,
    "expert_block_size",
    cfg.expert_block_size is None
    or (_is_int(cfg.expert_block_size) and cfg.expert_block_size >= 1),
    "must be None (automatic) or an int >= 1",
  )
  windows = cfg.dropless_windows
  _check(
    cfg,
    "dropless_windows",
    isinstance(windows, tuple)
    and all(_is_finite_number(c) and c > 0 for c in windows)
    and all(a < b for a, b in zip(windows, windows[1:])),
    "must be a tuple of increasing numbers > 0, e.g. (1.0, 1.0625); () for no fast path",
  )
  _check(cfg, "ep_exchange", cfg.ep_exchange in EP_EXCHANGES, f"allowed: {EP_EXCHANGES}")
  _check(
    cfg,
    "ragged_buffer_factor",
    _is_finite_number(cfg.ragged_buffer_factor) and cfg.ragged_buffer_factor > 0,
    "must be a finite number > 0",
  )
  _check(
    cfg,
    "ragged_buffer_min_rows",
    _is_int(cfg.ragged_buffer_min_rows) and cfg.ragged_buffer_min_rows >= 1,
    "must be an int >= 1",
  )
  _check(
    cfg,
    "dropless",
    not (cfg.dropless and cfg.router == "expert_choice"),
    "expert_choice never drops by construction of its capacity; set dropless=False",
  )


def validate_methods(cfg: MoEConfig) -> None:
  """The fields of the multi-gate (MMoE / HoME) and pre-gating (Read-ME) routers."""
  for name in ("num_tasks", "num_category_experts", "num_task_experts"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_int(v) and v >= 0, "must be an int >= 0")
  _check(
    cfg,
    "pregate_d_hidden",
    _is_int(cfg.pregate_d_hidden) and cfg.pregate_d_hidden >= 1,
    "must be an int >= 1",
  )
  multigate = cfg.router == "multigate"
  _check(
    cfg,
    "num_tasks",
    (cfg.num_tasks >= 1) == multigate,
    "router='multigate' needs num_tasks >= 1; other routers need 0",
  )
  cats = cfg.task_categories
  _check(
    cfg,
    "task_categories",
    isinstance(cats, tuple)
    and all(_is_int(c) and c >= 0 for c in cats)
    and (not cats or len(cats) == cfg.num_tasks),
    f"must be () or num_tasks={cfg.num_tasks} ints >= 0 (each task's category)",
  )
  if not multigate:
    for name in ("num_category_experts", "num_task_experts"):
      _check(cfg, name, getattr(cfg, name) == 0, "only router='multigate' uses it; set 0")
    return
  num_categories = max(cats) + 1 if cats else 1
  specific = num_categories * cfg.num_category_experts + cfg.num_tasks * cfg.num_task_experts
  _check(
    cfg,
    "num_experts",
    cfg.num_experts >= specific,
    f"must be >= the {specific} category and task experts of the HoME hierarchy",
  )
  per_task = cfg.num_experts - specific + cfg.num_category_experts + cfg.num_task_experts
  _check(
    cfg,
    "top_k",
    cfg.top_k <= per_task + cfg.num_compressed_experts,
    f"must be <= the {per_task + cfg.num_compressed_experts} experts each task's gate may pick",
  )


def _validate_deepseek_fields(cfg: MoEConfig) -> None:
  """n_group, topk_group, norm_topk_prob, bias_update_rate (DeepSeek-V2/V3 routing) and
  the shared-expert shape (shared_expert_d_ff, shared_expert_gate)."""
  _check(
    cfg,
    "shared_expert_d_ff",
    cfg.shared_expert_d_ff is None
    or (_is_int(cfg.shared_expert_d_ff) and cfg.shared_expert_d_ff >= 1),
    "must be None (num_shared_experts * expert_d_ff) or an int >= 1",
  )
  for name in ("shared_expert_d_ff", "shared_expert_gate"):
    _check(
      cfg,
      name,
      cfg.num_shared_experts >= 1 or getattr(cfg, name) in (None, False),
      "needs num_shared_experts >= 1",
    )
  _check(cfg, "shared_expert_gate", _is_bool(cfg.shared_expert_gate), "must be a bool")
  grouped = ("shared_experts", "deepseek_v3")
  _check(cfg, "n_group", _is_int(cfg.n_group) and cfg.n_group >= 1, "must be an int >= 1")
  _check(
    cfg,
    "n_group",
    cfg.n_group == 1 or cfg.router in grouped,
    f"group-limited routing needs router in {grouped}; set it to 1",
  )
  _check(
    cfg,
    "n_group",
    cfg.num_experts % cfg.n_group == 0,
    f"must divide num_experts={cfg.num_experts}",
  )
  per_group = cfg.num_experts // cfg.n_group
  _check(
    cfg,
    "n_group",
    cfg.n_group == 1 or cfg.router != "deepseek_v3" or per_group >= 2,
    "deepseek_v3 scores a group by its two best experts: needs num_experts / n_group >= 2",
  )
  _check(
    cfg,
    "topk_group",
    _is_int(cfg.topk_group) and 1 <= cfg.topk_group <= cfg.n_group,
    f"must be an int in [1, n_group={cfg.n_group}]",
  )
  _check(
    cfg,
    "top_k",
    cfg.n_group == 1 or cfg.top_k <= cfg.topk_group * per_group,
    f"must be <= topk_group * num_experts / n_group = {cfg.topk_group * per_group}",
  )
  _check(
    cfg,
    "norm_topk_prob",
    _is_bool(cfg.norm_topk_prob) and (cfg.router == "deepseek_v3" or not cfg.norm_topk_prob),
    "a bool, True only for router='deepseek_v3' (others: router_order='topk_softmax')",
  )
  _check(
    cfg,
    "bias_update_rate",
    _is_finite_number(cfg.bias_update_rate) and cfg.bias_update_rate >= 0,
    "must be a finite number >= 0",
  )
  _check(
    cfg,
    "bias_update_rate",
    cfg.router == "deepseek_v3" or cfg.bias_update_rate == 0,
    "only router='deepseek_v3' has a selection bias; set it to 0",
  )
