"""Run a model over batches and capture per-layer routing and expert activations.

Each MoE layer's input (its ``ffn_norm`` output, grabbed with Flax
``capture_intermediates``) is routed and run through the expert FFNs again from the
layer's params, as ``moejax.layers`` computes them, and reduced on device to per-batch
masked sums (``layer_sums`` lists them) that ``accumulate`` adds up on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moejax.config import ExperimentConfig, ModelConfig
from moejax.data import make_eval_iterator
from moejax.layers.dispatch import dispatch
from moejax.layers.ffn import expert_ffn
from moejax.layers.moe import to_groups
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.routers import route
from moejax.routers.base import entropy

MAX_KEYS = ("max_abs",)  # accumulated with max; every other key is a sum


def _is_ffn_norm(module, method_name: str) -> bool:
  return method_name == "__call__" and module.name == "ffn_norm"


def moe_layer_inputs(model, params, tokens: jax.Array) -> tuple[jax.Array, dict[int, jax.Array]]:
  """(logits [B, L, V], {i: x_i [B, L, d]}) with x_i the input of MoE layer i.

  x_i is the output of block i's ``ffn_norm`` as captured by ``capture_intermediates``.
  """
  (logits, _), state = model.apply(
    {"params": params}, tokens, capture_intermediates=_is_ffn_norm, mutable=["intermediates"]
  )
  inter = state["intermediates"]
  return logits, {i: inter[f"layers_{i}"]["ffn_norm"]["__call__"][0] for i in model.cfg.moe_layers}


def selected_experts(routing, processed: jax.Array, cfg: MoEConfig) -> jax.Array:
  """S bool[G, S, E]: the real experts the router chose per token before capacity, read
  from the router's own assignments (``Routing.expert_index`` / ``valid``: top-k, or the
  top-p prefix capped at top_k; null picks are not valid). Expert choice has no per-token
  choice, so S = A (nothing is dropped by construction).
  """
  if not cfg.is_token_choice:
    return processed
  onehot = jax.nn.one_hot(routing.expert_index, cfg.num_experts, dtype=jnp.float32)  # [G,S,K,E]
  return jnp.sum(onehot * routing.valid[..., None], axis=2) > 0


def layer_sums(x: jax.Array, mask: jax.Array, ffn: dict, cfg: MoEConfig) -> dict[str, jax.Array]:
  """Per-batch sums of one MoE layer, over tokens t with mask m_t: A_{t,e} = t holds a valid
  slot of real expert e, S_{t,e} = the router chose e before capacity, p_t = softmax(l_t)
  (deepseek_v3: sigmoid(l_t) / sum sigmoid(l_t), its own distribution)
  over all R router logits, g_{t,e} the combine weight, y_{t,e} = FFN_e(x_t):

    tokens sum_t m_t;  processed [E] sum_t m_t A_{t,e};  selected [E] sum_t m_t S_{t,e}
    coactivation [E, E] sum_t m_t A_{t,i} A_{t,j};  unprocessed sum_t m_t [sum_e A_{t,e} = 0]
    entropy sum_t m_t H(p_t) (nats);  prob [R] sum_t m_t p_{t,r} (PreMoe)
    gate_norm [E] sum_t m_t A_{t,e} g_{t,e} ||y_{t,e}||_2 (EASY-EP)
    max_abs [E] max over m_t A_{t,e} of max_k |y_{t,e,k}| (super experts; a maximum)
    logit_gram [E, E] sum_t m_t l_{t,i} l_{t,j} (MC-SMoE router-logit similarity)

  Args:
    x: [B, L, d] the layer input (ffn_norm output) in compute dtype.
    mask: [B, L] 1 for tokens to count, 0 for padding.
    ffn: the layer's params {'router' [d, R], 'wi_gate', 'wi_up' [E, d, f], 'wo' [E, f, d]}.
  """
  e = cfg.num_experts
  xg = to_groups(x, cfg.group_size)  # [G, S, d]
  g, s, _ = xg.shape
  m = mask.reshape(g, s).astype(jnp.float32)  # [G, S]
  logits = jnp.einsum(
    "gsd,dr->gsr", xg.astype(jnp.float32), jnp.asarray(ffn["router"], jnp.float32)
  )  # [G, S, R]
  bias = ffn.get("router_bias")  # DeepSeek-V3 selection bias: the run's real routing
  routing = route(logits, cfg, bias=None if bias is None else jnp.asarray(bias, jnp.float32))
  di, valid, w = routing.dispatch_index, routing.slot_valid, routing.combine_weight  # [G,E,C]
  c = di.shape[-1]
  gi = jnp.arange(g)[:, None, None]
  ei = jnp.arange(e)[None, :, None]
  processed = (
    jnp.zeros((g, s, e), jnp.int32)
    .at[  # A: bool[G, S, E]
      jnp.broadcast_to(gi, di.shape), di, jnp.broadcast_to(ei, di.shape)
    ]
    .max(valid.astype(jnp.int32))
    > 0
  )
  selected = selected_experts(routing, processed, cfg)

  cast = lambda a: jnp.asarray(a, xg.dtype)
  y = expert_ffn(
    dispatch(xg, di, valid),
    cast(ffn["wi_gate"]),
    cast(ffn["wi_up"]),
    cast(ffn["wo"]),
    cfg.activation,
  ).astype(jnp.float32)  # [G, E, C, d]
  slot_m = jnp.take_along_axis(m, di.reshape(g, e * c), axis=1).reshape(g, e, c) * valid
  y_norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1))  # [G, E, C]
  y_max = jnp.max(jnp.abs(y), axis=-1)  # [G, E, C]

  a = processed.astype(jnp.float32) * m[..., None]  # [G, S, E]
  if cfg.router == "deepseek_v3":  # its distribution: normalised sigmoid affinities
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    probs = jax.nn.softmax(logits, axis=-1)
  token_entropy = entropy(probs)  # [G, S]
  real = logits[..., :e]
  return {
    "tokens": jnp.sum(m),
    "processed": jnp.sum(a, axis=(0, 1)),
    "selected": jnp.sum(selected.astype(jnp.float32) * m[..., None], axis=(0, 1)),
    "coactivation": jnp.einsum("gsi,gsj->ij", a, processed.astype(jnp.float32)),
    "unprocessed": jnp.sum(m * (jnp.sum(processed, axis=-1) == 0)),
    "entropy": jnp.sum(m * token_entropy),
    "prob": jnp.sum(probs * m[..., None], axis=(0, 1)),
    "gate_norm": jnp.sum(slot_m * w * y_norm, axis=(0, 2)),
    "max_abs": jnp.max(jnp.where(slot_m > 0, y_max, 0.0), axis=(0, 2)),
    "logit_gram": jnp.einsum("gsi,gsj->ij", real * m[..., None], real),
  }


@functools.lru_cache(maxsize=16)
def batch_sums_fn(model_cfg: ModelConfig):
  """A jitted ``f(params, tokens i32[B, L], mask [B, L]) -> {layer i: layer_sums}``.

  Runs the single-device model (no mesh); cached per (hashable) ModelConfig.
  """
  model = Transformer(model_cfg)

  def f(params, tokens, mask):
    _, inputs = moe_layer_inputs(model, params, tokens)
    return {
      i: layer_sums(x, mask, params[f"layers_{i}"]["ffn"], model_cfg.moe) for i, x in inputs.items()
    }

  return jax.jit(f)


def accumulate(total: dict | None, new: dict) -> dict:
  """Adds one batch's sums ({layer: {key: array}}) into float64 host totals."""
  new = jax.device_get(new)
  if total is None:
    return {i: {k: np.asarray(v, np.float64) for k, v in d.items()} for i, d in new.items()}
  for i, d in new.items():
    for k, v in d.items():
      op = np.maximum if k in MAX_KEYS else np.add
      total[i][k] = op(total[i][k], np.asarray(v, np.float64))
  return total


def collect_sums(
  model_cfg: ModelConfig,
  params,
  batches: Iterable[dict],
  num_batches: int | None = None,
  progress: bool = True,
) -> dict[int, dict]:
  """Accumulated per-layer sums {MoE layer i: {key: np.ndarray}} over `batches`.

  batches: dicts with 'inputs' i32[B, L] and optionally 'mask' [B, L] (default all ones).
  """
  if model_cfg.moe is None:
    raise ValueError("the model has no MoE layers (model.moe_every=0): nothing to analyse")
  if model_cfg.moe.router in ("multigate", "pregate"):
    raise ValueError(
      f"model.moe.router={model_cfg.moe.router!r}: expert statistics (stats, prune, merge, "
      "compress) route from each layer's own router kernel; multi-gate and pre-gating runs "
      "are not supported"
    )
  fn = batch_sums_fn(model_cfg)
  params = jax.device_put(params)  # once, not per batch
  total = None
  for batch in tqdm(
    batches,
    total=num_batches,
    disable=not progress,
    desc="batches",
    unit="batch",
    dynamic_ncols=True,
  ):
    tokens = np.asarray(batch["inputs"], np.int32)
    mask = np.asarray(batch.get("mask", np.ones(tokens.shape)), np.float32)
    total = accumulate(total, fn(params, tokens, mask))
  if total is None:
    raise ValueError("no batches to analyse")
  return total


def split_batches(config: ExperimentConfig, split: str, num_batches: int) -> Iterator[dict]:
  """The first `num_batches` batches of data split `split`, in order (one host's view of
  the global batch: ``make_eval_iterator`` with ``data.eval_split = split``)."""
  data = dataclasses.replace(config.data, eval_split=split)
  for i, batch in enumerate(make_eval_iterator(data, 0, 1)):
    if i >= num_batches:
      return
    yield batch
