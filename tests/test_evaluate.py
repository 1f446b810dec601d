"""moejax.evaluate: reproduces the trainer's eval loss; bits per byte by definition."""

import json
import math

import jax
import numpy as np
import pytest

from moejax.data import make_eval_iterator
from moejax.evaluate import evaluate_params, evaluate_run
from moejax.evaluate import main as evaluate_main
from moejax.models import Transformer
from moejax.training.experiment import build_experiment
from moejax.training.trainer import train
from tests.helpers import tiny_config
from tests.test_generate import random_params


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """A 2-step tiny run (one device) with its final eval: (workdir, TrainResult)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, mesh=(1, 1, 1))
  result = train(cfg, workdir, show_progress=False, devices=jax.devices()[:1])
  return workdir, result


@pytest.mark.slow
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
  assert evaluate_main(["--workdir", workdir, "--json", "--batches", "1", "--one_device"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["step"] == 2 and record["batches"] == 1 and record["tokens"] == 8 * 32


def test_evaluate_errors_are_clean(tmp_path, capsys):
  assert evaluate_main(["--workdir", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err


def test_evaluate_matches_the_definitions(data_dir):
  """loss = mean masked CE over the eval batches, bits/byte = nats / (ln 2 * bytes), against
  a plain forward and a numpy log-softmax."""
  config = tiny_config(data_dir, mesh=(1, 1, 1))
  with config.unlocked():
    config.model.num_layers, config.model.first_moe_layer = 1, 0
  exp = build_experiment(config, devices=jax.devices()[:1])
  cfg = exp.config
  params = random_params(cfg.model, seed=4)
  result = evaluate_params(exp, params, num_batches=2)
  assert result.batches == 2 and result.split == "validation"
  nats, tokens, nbytes = 0.0, 0.0, 0.0
  forward = jax.jit(lambda p, x: Transformer(cfg.model).apply({"params": p}, x)[0])
  for _, batch in zip(range(2), make_eval_iterator(cfg.data, 0, 1)):
    logits = np.asarray(forward(params, batch["inputs"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    nats += float((ce * batch["mask"]).sum())
    tokens += float(batch["mask"].sum())
    nbytes += float(((batch["targets"] >= 3) * batch["mask"]).sum())  # byte ids are 3..258
  assert result.tokens == tokens and result.bytes == nbytes
  np.testing.assert_allclose(result.loss, nats / tokens, rtol=1e-5)
  np.testing.assert_allclose(result.bits_per_byte, nats / (math.log(2) * nbytes), rtol=1e-5)
  assert 0.0 <= result.router["layers_0"]["dropped_fraction"] < 1.0
  assert "bits/byte" in result.summary()


@pytest.mark.slow
def test_upcycle_reports_the_same_eval_before_and_after(data_dir, tmp_path, capsys):
  """Sparse upcycling keeps the function at step 0, so the reported eval loss is unchanged."""
  from moejax.convert.cli import main as convert_main
  from moejax.evaluate import evaluate_before_after
  from moejax.training.workdir import write_run

  dense = tiny_config(data_dir, mesh=(-1, 1, 1))
  with dense.unlocked():
    dense.model.moe_every = 0
  params = random_params(build_experiment(dense).model_cfg, seed=3)
  write_run(dense, str(tmp_path / "dense"), params)
  argv = ["upcycle", "--workdir", str(tmp_path / "dense"), "--out", str(tmp_path / "moe")]
  assert convert_main(argv + ["--num_experts", "4", "--eval_batches", "1"]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("eval on 256 validation tokens: loss ")
  report = evaluate_before_after(str(tmp_path / "dense"), None, str(tmp_path / "moe"), 1)
  np.testing.assert_allclose(report["after"]["loss"], report["before"]["loss"], rtol=1e-5)


def test_score_step_routes_each_token_by_its_task_as_the_eval_step_does(data_dir):
  """A multi-gate model is scored with the batch's task_id (the trainer's eval step does),
  not with task 0 for every token."""
  from moejax.config import ExperimentConfig
  from moejax.evaluate import make_score_step
  from moejax.training.step import make_eval_step

  cfg = tiny_config(data_dir, router="multigate", num_tasks=2, num_task_experts=1)
  cfg.data.num_tasks = 2
  cfg.model.num_layers, cfg.model.first_moe_layer = 1, 0
  model_cfg = ExperimentConfig.from_config(cfg).model
  model = Transformer(model_cfg)
  params = random_params(model_cfg, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(2, 9))
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "mask": np.ones((2, 8), np.float32),
    "task_id": np.ones((2, 8), np.int32),
  }
  score = jax.jit(make_score_step(model, np.ones(model_cfg.vocab_size)))
  scored = score(params, batch)
  reference = jax.jit(make_eval_step(model))(params, batch)
  np.testing.assert_allclose(scored["ce_sum"], reference["ce_sum"], rtol=1e-6)
  task0 = score(params, {**batch, "task_id": np.zeros((2, 8), np.int32)})
  routed = jax.tree.leaves(scored["router"]), jax.tree.leaves(task0["router"])
  assert any(not np.allclose(a, b) for a, b in zip(*routed))  # the task changes the routing
