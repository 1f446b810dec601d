"""Pure train and eval steps: (state, batch) -> (state, metrics).

loss = mean cross-entropy over target tokens + sum of the MoE layers' weighted aux losses
(load balance, router z-loss, and router-specific terms).

Gradient accumulation (``microbatches`` = K > 1): the batch's rows split into K
microbatches (row r goes to microbatch r % K, so every device keeps its own rows), a
``lax.scan`` sums per microbatch k

  loss_k = sum_t m_t CE_t / max(sum over the *whole* batch of m_t, 1) + aux_k / K

and their gradients: the cross-entropy part is exactly the big batch's; the aux losses
(per-batch statistics such as load balance) become their mean over the microbatches.
"""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel.mesh import TOKEN_AXES
from moejax.training.router_bias import updated_router_biases
from moejax.training.state import TrainState

Batch = dict  # inputs i32[B, L], targets i32[B, L], mask f32[B, L] (+ task_id i32[B, L])


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """CE_t = -log softmax(logits_t)[target_t] in float32: [B, L, V], [B, L] -> [B, L]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean token cross-entropy over mask: sum_t m_t CE_t / max(sum_t m_t, 1)."""
  per_token = token_cross_entropy(logits, targets)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _forward(model: nn.Module, params, batch: Batch):
  logits, aux = model.apply({"params": params}, batch["inputs"], task_id=batch.get("task_id"))
  ce = cross_entropy(logits, batch["targets"], batch["mask"])
  aux_total = sum(aux["aux_losses"].values(), jnp.zeros((), jnp.float32))
  return ce + aux_total, (ce, aux)


def _metrics(loss, ce, aux) -> dict:
  metrics = {"loss": loss, "ce_loss": ce}
  metrics.update({f"aux/{k}": v for k, v in aux["aux_losses"].items()})
  metrics.update(
    {
      f"router/{layer}/{k}": v
      for layer, layer_metrics in aux["metrics"].items()
      for k, v in layer_metrics.items()
    }
  )
  return metrics


def split_microbatches(batch: Batch, k: int, mesh=None) -> Batch:
  """[B, ...] -> [K, B / K, ...], microbatch k holding rows k, K + k, 2K + k, ...

  Strided so that each device's contiguous block of rows splits locally (no data moves);
  on a `mesh` the B / K axis is constrained to the token axes.
  """

  def split(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch of {b} rows does not split into train.microbatches={k}")
    x = jnp.moveaxis(x.reshape(b // k, k, *x.shape[1:]), 1, 0)
    if mesh is not None:
      spec = P(None, TOKEN_AXES, *([None] * (x.ndim - 2)))
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x

  return jax.tree.map(split, batch)


def _accumulated_grads(model: nn.Module, params, batch: Batch, k: int):
  """(loss, (ce, aux)), grads summed over K microbatches (module docstring)."""
  tokens = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
  micro = split_microbatches(batch, k, getattr(model, "mesh", None))

  def loss_fn(p, mb):
    logits, aux = model.apply({"params": p}, mb["inputs"], task_id=mb.get("task_id"))
    per_token = token_cross_entropy(logits, mb["targets"])
    ce = jnp.sum(per_token * mb["mask"]) / tokens
    aux_total = sum(aux["aux_losses"].values(), jnp.zeros((), jnp.float32))
    return ce + aux_total / k, (ce, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(acc, mb):
    (loss, (ce, aux)), grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, (loss, ce, grads)), aux

  zeros = (
    jnp.zeros((), jnp.float32),
    jnp.zeros((), jnp.float32),
    jax.tree.map(jnp.zeros_like, params),
  )
  (loss, ce, grads), auxes = jax.lax.scan(body, zeros, micro)
  aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes)  # mean over microbatches
  return (loss, (ce, aux)), grads


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  nan_policy: str = "stop",
  microbatches: int = 1,
) -> Callable:
  """Builds train_step(state, batch) -> (state, metrics).

  With nan_policy='skip', a step whose loss or gradient norm is not finite leaves the
  state unchanged except for the step counter (metrics['skipped'] = 1); with 'stop' the
  update is applied and the caller stops on the non-finite metric, never saving it.
  microbatches > 1 accumulates gradients over that many slices of the batch inside the
  step (module docstring). DeepSeek-V3 ``router_bias`` leaves take the sign-rule update
  on the step's expert load instead of the optimizer's (``moejax.training.router_bias``).
  """

  model_cfg = getattr(model, "cfg", None)

  def train_step(state: TrainState, batch: Batch):
    if microbatches > 1:
      (loss, (ce, aux)), grads = _accumulated_grads(model, state.params, batch, microbatches)
    else:
      grad_fn = jax.value_and_grad(lambda p: _forward(model, p, batch), has_aux=True)
      (loss, (ce, aux)), grads = grad_fn(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = updated_router_biases(params, state.params, aux["metrics"], model_cfg)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == "skip":
      keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params = keep_new(params, state.params)
      opt_state = keep_new(opt_state, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = _metrics(loss, ce, aux)
    metrics.update(
      grad_norm=grad_norm, learning_rate=schedule(state.step), skipped=(~finite).astype(jnp.float32)
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(params, batch) -> {'ce_sum', 'tokens'}: summed masked token cross-entropy and
  the token count, so that averages over batches and hosts are exact."""

  def eval_step(params, batch: Batch):
    logits, _ = model.apply({"params": params}, batch["inputs"], task_id=batch.get("task_id"))
    per_token = token_cross_entropy(logits, batch["targets"])
    return {"ce_sum": jnp.sum(per_token * batch["mask"]), "tokens": jnp.sum(batch["mask"])}

  return eval_step


def mean_eval_loss(eval_step: Callable, params, batches: Iterable) -> float:
  """sum ce_sum / sum tokens of ``eval_step`` over `batches`: the exact token mean."""
  ce_sum, tokens = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    ce_sum += float(out["ce_sum"])
    tokens += float(out["tokens"])
  return ce_sum / max(tokens, 1.0)
