"""moejax.evaluate: reproduces the trainer's eval loss; bits per byte by definition."""

import json
import math

import jax
import numpy as np
import pytest

from moejax.evaluate import evaluate_run
from moejax.evaluate import main as evaluate_main
from moejax.training.trainer import train
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """A 2-step tiny run (one device) with its final eval: (workdir, TrainResult)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, mesh=(1, 1, 1))
  result = train(cfg, workdir, show_progress=False, devices=jax.devices()[:1])
  return workdir, result


def test_evaluate_reproduces_the_trainers_last_eval_loss(finished_run, capsys):
  workdir, result = finished_run
  evaluated, step = evaluate_run(workdir)
  assert step == result.final_step == 2
  np.testing.assert_allclose(evaluated.loss, result.eval_losses[2], rtol=1e-6)
  # Byte tokenizer: a target is one byte unless it is bos/eos, so bytes < tokens and
  # bits/byte = total nats / (ln 2 * bytes).
  assert 0 < evaluated.bytes < evaluated.tokens == 2 * 8 * 32
  total_nats = evaluated.loss * evaluated.tokens
  assert evaluated.bits_per_byte == pytest.approx(total_nats / (math.log(2) * evaluated.bytes))
  assert evaluated.perplexity == pytest.approx(math.exp(evaluated.loss))
  assert set(evaluated.router) == {"layers_1"}
  assert len(evaluated.router["layers_1"]["expert_load"]) == 4
  assert evaluate_main(["--workdir", workdir, "--json", "--batches", "1"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["step"] == 2 and record["batches"] == 1 and record["tokens"] == 8 * 32


def test_evaluate_errors_are_clean(tmp_path, capsys):
  assert evaluate_main(["--workdir", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err
