"""Pure train and eval steps: (state, batch) -> (state, metrics).

loss = mean cross-entropy over target tokens + sum of the MoE layers' weighted aux losses
(load balance, router z-loss, and router-specific terms).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.training.state import TrainState

Batch = dict  # inputs i32[B, L], targets i32[B, L], mask f32[B, L]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean token cross-entropy over mask: sum_t m_t CE_t / max(sum_t m_t, 1)."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _forward(model: nn.Module, params, batch: Batch):
  logits, aux = model.apply({"params": params}, batch["inputs"])
  ce = cross_entropy(logits, batch["targets"], batch["mask"])
  aux_total = sum(aux["aux_losses"].values(), jnp.zeros((), jnp.float32))
  return ce + aux_total, (ce, aux)


def _metrics(loss, ce, aux) -> dict:
  metrics = {"loss": loss, "ce_loss": ce}
  metrics.update({f"aux/{k}": v for k, v in aux["aux_losses"].items()})
  metrics.update({f"router/{layer}/{k}": v for layer, layer_metrics in aux["metrics"].items()
                  for k, v in layer_metrics.items()})
  return metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, nan_policy: str = "stop") -> Callable:
  """Builds train_step(state, batch) -> (state, metrics).

  With nan_policy='skip', a step whose loss or gradient norm is not finite leaves the
  state unchanged except for the step counter (metrics['skipped'] = 1); with 'stop' the
  update is applied and the caller stops on the non-finite metric, never saving it.
  """

  def train_step(state: TrainState, batch: Batch):
    grad_fn = jax.value_and_grad(lambda p: _forward(model, p, batch), has_aux=True)
    (loss, (ce, aux)), grads = grad_fn(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == "skip":
      keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params = keep_new(params, state.params)
      opt_state = keep_new(opt_state, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = _metrics(loss, ce, aux)
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                   skipped=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(params, batch) -> {'ce_sum', 'tokens'}: summed masked token cross-entropy and
  the token count, so that averages over batches and hosts are exact."""

  def eval_step(params, batch: Batch):
    logits, _ = model.apply({"params": params}, batch["inputs"])
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])
    return {"ce_sum": jnp.sum(per_token * batch["mask"]), "tokens": jnp.sum(batch["mask"])}

  return eval_step
