"""Optimizer and learning-rate schedule, built from the ``train`` config with optax."""

from __future__ import annotations

import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * end_lr_ratio`` at ``steps`` (Loshchilov & Hutter, 2017)."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train_cfg.learning_rate,
    warmup_steps=train_cfg.warmup_steps,
    decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
    end_value=train_cfg.learning_rate * train_cfg.end_lr_ratio,
  )


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter, 2019) after global-norm gradient clipping."""
  return optax.chain(
    optax.clip_by_global_norm(train_cfg.grad_clip_norm),
    optax.adamw(
      learning_rate_schedule(train_cfg),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      weight_decay=train_cfg.weight_decay,
    ),
  )
