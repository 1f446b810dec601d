"""End-to-end training: loss goes down, exact resume, sharded == single device."""

import json
import os

import jax
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.training.trainer import Trainer, train
from tests.helpers import tiny_config


def _losses(result):
  return np.array([result.losses[s] for s in sorted(result.losses)])


def test_few_steps_reduce_loss_and_write_checkpoint(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=30, learning_rate=3e-3, checkpoint_every=30)
  trainer = Trainer(cfg, str(tmp_path / "run"), show_progress=False, devices=jax.devices()[:1])
  seen = []  # (step, losses recorded so far): a hook sees every loss up to its step
  trainer.add_hook(7, lambda t, step: seen.append((step, sorted(t.losses)[-1:])))
  result = trainer.run()
  assert seen == [(7, [7]), (14, [14]), (21, [21]), (28, [28])]  # log_every=1 flushes
  losses = _losses(result)
  assert losses.shape == (30,)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean() - 0.5, losses
  assert result.final_step == 30
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "30")
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  train_records = [r for r in records if "loss" in r]
  assert train_records and all("tokens_per_s" in r and "grad_norm" in r for r in train_records)
  assert any(k.endswith("expert_load") for k in train_records[-1])
  assert any("eval_loss" in r for r in records)


def test_resume_reproduces_uninterrupted_losses(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=8, checkpoint_every=4, eval_every=0)
  one = jax.devices()[:1]
  full = train(cfg, str(tmp_path / "full"), show_progress=False, devices=one)
  first = train(cfg, str(tmp_path / "split"), show_progress=False, max_steps=4, devices=one)
  assert first.final_step == 4 and first.stopped_by == "max_steps"
  second = train(cfg, str(tmp_path / "split"), show_progress=False, devices=one)
  assert sorted(second.losses) == [5, 6, 7, 8]
  resumed = np.array(
    [first.losses[s] for s in range(1, 5)] + [second.losses[s] for s in range(5, 9)]
  )
  np.testing.assert_array_equal(resumed, _losses(full))


def test_sharded_training_matches_single_device(tmp_path, data_dir):
  cfg1 = tiny_config(data_dir, steps=4, checkpoint_every=100, mesh=(1, 1, 1), eval_every=0)
  single = train(cfg1, str(tmp_path / "one"), show_progress=False, devices=jax.devices()[:1])
  cfg8 = tiny_config(data_dir, steps=4, checkpoint_every=100, mesh=(2, 4, 1), eval_every=0)
  sharded = train(cfg8, str(tmp_path / "eight"), show_progress=False)
  np.testing.assert_allclose(_losses(sharded), _losses(single), rtol=2e-4, atol=2e-4)


def test_bad_config_rejected_before_training(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=2)
  with cfg.unlocked():
    cfg.model.moe.top_k = cfg.model.moe.num_experts + 1
  with pytest.raises(ConfigError, match="model.moe.top_k"):
    train(cfg, str(tmp_path / "bad"), show_progress=False)
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_existing_checkpoints_without_resume_refused(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, eval_every=0)
  train(cfg, str(tmp_path / "run"), show_progress=False, devices=jax.devices()[:1])
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    train(cfg, str(tmp_path / "run"), resume=False, show_progress=False, devices=jax.devices()[:1])
