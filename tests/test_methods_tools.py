"""Compressed Experts (compress), Read-ME refactoring (readme-split) and multi-task batches:
the offline pieces against hand-written references, the CLIs end to end (slow)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moejax.analysis.collect import moe_layer_inputs
from moejax.compress.compressed import compress_model, expected_outputs
from moejax.compress.readme_split import activation_patterns, balanced_kmeans, readme_split_params
from moejax.config import ExperimentConfig, ModelConfig
from moejax.data.pipeline import LMBatchIterator, document_task
from moejax.data.tokenizer import ByteTokenizer
from moejax.models import Transformer
from tests.helpers import init_model_params, tiny_config
from tests.reference import gated_ffn_np

MOE = dict(router="topk", router_order="topk_softmax", dropless=True, top_k=2)


def model_cfg_of(config) -> ModelConfig:
  return ModelConfig.from_config(config.model)


def random_params(model_cfg, seed=3):
  """The model's own init with routers 50x larger (clear routing margins, no near-ties)."""
  params = jax.device_get(init_model_params(model_cfg, seed))
  return jax.tree_util.tree_map_with_path(
    lambda path, v: v * 50 if "router" in jax.tree_util.keystr(path) else v, params
  )


def token_batches(model_cfg, n=2, shape=(2, 16), seed=0):
  rng = np.random.default_rng(seed)
  return [
    {"inputs": rng.integers(3, model_cfg.vocab_size, shape).astype(np.int32)} for _ in range(n)
  ]


def logits_fn(model_cfg):
  return jax.jit(lambda p, t: Transformer(model_cfg).apply({"params": p}, t)[0])


def test_compressed_vectors_are_mean_outputs_and_other_tokens_are_unchanged():
  config = tiny_config("/unused", **MOE)  # layer 1 (the last) is the only MoE layer
  model_cfg = model_cfg_of(config)
  params = random_params(model_cfg)
  batches = token_batches(model_cfg)
  vectors = expected_outputs(model_cfg, params, batches)[1]  # [E, d]
  # reference: mean FFN_e(x_t) over the tokens whose top-2 holds e
  ffn = {k: np.asarray(v, np.float64) for k, v in params["layers_1"]["ffn"].items()}
  capture = jax.jit(lambda p, t: moe_layer_inputs(Transformer(model_cfg), p, t)[1][1])
  xs = np.concatenate([np.asarray(capture(params, b["inputs"])) for b in batches])
  xs = xs.reshape(-1, model_cfg.d_model).astype(np.float64)
  top2 = np.argsort(-(xs @ ffn["router"]), axis=-1, kind="stable")[:, :2]
  for e in range(4):
    chose = np.any(top2 == e, axis=-1)
    assert chose.any()
    want = np.mean(
      [
        gated_ffn_np(x, ffn["wi_gate"][e], ffn["wi_up"][e], ffn["wo"][e], "silu") for x in xs[chose]
      ],
      axis=0,
    )
    np.testing.assert_allclose(vectors[e], want, rtol=1e-4, atol=1e-5)

  sums = {1: {"gate_norm": np.array([4.0, 1.0, 3.0, 2.0])}}  # easy_ep scores: drop 1 and 3
  all_vectors = {1: vectors}
  new_config, new_params, kept, _ = compress_model(
    ExperimentConfig.from_config(config), model_cfg, params, sums, all_vectors, 2, "easy_ep"
  )
  assert kept == {1: [0, 2]}
  new_ffn = new_params["layers_1"]["ffn"]
  np.testing.assert_array_equal(new_ffn["router"], ffn["router"][:, [0, 2, 1, 3]])
  np.testing.assert_array_equal(new_ffn["compressed"], vectors[[1, 3]].astype(np.float32))
  new_cfg = model_cfg_of(new_config)
  assert (new_cfg.moe.num_experts, new_cfg.moe.num_compressed_experts) == (2, 2)
  tokens = batches[0]["inputs"]
  before = np.asarray(logits_fn(model_cfg)(params, tokens)).reshape(-1, model_cfg.vocab_size)
  after = np.asarray(logits_fn(new_cfg)(new_params, tokens)).reshape(-1, model_cfg.vocab_size)
  untouched = ~np.any(np.isin(top2[: tokens.size], [1, 3]), axis=-1)
  assert untouched.any() and (~untouched).any()
  np.testing.assert_allclose(after[untouched], before[untouched], rtol=1e-5, atol=1e-5)
  assert not np.allclose(after[~untouched], before[~untouched], atol=1e-3)


def test_balanced_kmeans_recovers_coactivated_groups():
  rng = np.random.default_rng(0)
  base = rng.random((4, 64))  # 4 activation patterns over 64 tokens
  group = rng.permutation(np.repeat(np.arange(4), 8))  # 32 units, 8 per pattern
  feats = base[group] * rng.uniform(0.5, 2.0, (32, 1)) + 0.01 * rng.random((32, 64))
  labels = balanced_kmeans(feats, 4, seed=1)
  assert np.bincount(labels).tolist() == [8, 8, 8, 8]
  for g in range(4):  # each group lands in exactly one cluster
    assert len(set(labels[group == g].tolist())) == 1
  np.testing.assert_array_equal(labels, balanced_kmeans(feats, 4, seed=1))


def test_readme_split_all_experts_equals_dense_and_router_from_centroids():
  dense = tiny_config("/unused")
  with dense.unlocked():
    dense.model.moe_every = 0
  dense_cfg = model_cfg_of(dense)
  params = random_params(dense_cfg)
  batches = token_batches(dense_cfg)
  patterns = activation_patterns(dense_cfg, params, batches)
  assert patterns[0].shape == (dense_cfg.d_ff, 64)
  e = 4
  moe = tiny_config("/unused", **dict(MOE, top_k=e))
  with moe.unlocked():
    moe.model.first_moe_layer = 0
    moe.model.moe.num_experts = e
    moe.model.moe.expert_d_ff = dense_cfg.d_ff // e
  moe_cfg = model_cfg_of(moe)
  # router_scale 0: uniform weights 1/E over all E experts, w_down x E -> the dense FFN
  exact, labels = readme_split_params(params, patterns, e, e, 0.0, seed=0)
  tokens = batches[1]["inputs"]
  np.testing.assert_allclose(
    logits_fn(moe_cfg)(exact, tokens), logits_fn(dense_cfg)(params, tokens), rtol=1e-4, atol=1e-4
  )
  split, _ = readme_split_params(params, patterns, e, 2, 1.0, seed=0)
  wg = np.asarray(params["layers_0"]["ffn"]["wi_gate"])
  for k in range(e):
    units = np.flatnonzero(labels[0] == k)
    assert len(units) == dense_cfg.d_ff // e
    np.testing.assert_allclose(split["layers_0"]["ffn"]["router"][:, k], wg[:, units].mean(1))
    np.testing.assert_array_equal(split["layers_0"]["ffn"]["wi_gate"][k], wg[:, units])
    np.testing.assert_allclose(
      split["layers_0"]["ffn"]["wo"][k], 2 * np.asarray(params["layers_0"]["ffn"]["wo"])[units]
    )


def test_batches_carry_each_tokens_document_task_and_resume():
  docs = [{"text": f"document {i} " + "x" * (3 * i + 1)} for i in range(12)]
  tok = ByteTokenizer()
  stream = np.concatenate([tok.encode_document(d["text"]) for d in docs])
  tasks = np.concatenate(
    [np.full(len(tok.encode_document(d["text"])), document_task(d["text"], 3)) for d in docs]
  )
  assert len(set(tasks.tolist())) == 3
  kw = dict(seq_len=7, global_batch_size=2, shuffle=False, num_tasks=3)
  it = LMBatchIterator(docs, **kw)
  batches = [next(it) for _ in range(4)]
  for n, b in enumerate(batches):
    rows = np.arange(2)[:, None] * 8 + np.arange(7) + n * 16
    np.testing.assert_array_equal(b["inputs"], stream[rows])
    np.testing.assert_array_equal(b["task_id"], tasks[rows])
  again = LMBatchIterator(docs, **kw)
  next(again)
  state = again.get_state()
  resumed = LMBatchIterator(docs, **kw)
  resumed.set_state(state)
  for want in batches[1:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert "task_id" not in next(LMBatchIterator(docs, **dict(kw, num_tasks=0)))


# ------------------------------------------------------------------------------ slow: CLIs


@pytest.mark.slow
def test_compress_cli_writes_a_trainable_run(tmp_path, data_dir, capsys):
  from moejax.compress.cli import main
  from moejax.training.trainer import train
  from moejax.training.workdir import load_run_config, write_run

  config = tiny_config(data_dir, mesh=(-1, 1, 1), **MOE)
  write_run(config, str(tmp_path / "moe"), random_params(model_cfg_of(config)))
  out = str(tmp_path / "c")
  argv = ["compress", "--workdir", str(tmp_path / "moe"), "--out", out, "--num_compressed", "2"]
  assert main(argv + ["--batches", "1", "--eval_batches", "1", "--quiet"]) == 0
  assert "eval loss" in capsys.readouterr().out
  cfg = load_run_config(out)
  assert cfg.model.moe.num_experts == 2 and cfg.model.moe.num_compressed_experts == 2
  cfg = cfg.replace_fields({"train.steps": 2})
  result = train(cfg, out, show_progress=False, devices=jax.devices()[:1])
  assert result.final_step == 2 and np.all(np.isfinite(list(result.losses.values())))


@pytest.mark.slow
def test_readme_split_cli_writes_a_trainable_run(tmp_path, data_dir, capsys):
  from moejax.convert.cli import main
  from moejax.training.trainer import train
  from moejax.training.workdir import load_run_config, write_run

  dense = tiny_config(data_dir, mesh=(-1, 1, 1))
  with dense.unlocked():
    dense.model.moe_every = 0
  write_run(dense, str(tmp_path / "dense"), random_params(model_cfg_of(dense)))
  out = str(tmp_path / "moe")
  argv = ["readme-split", "--workdir", str(tmp_path / "dense"), "--out", out]
  assert main(argv + ["--num_experts", "4", "--batches", "1", "--eval_batches", "1"]) == 0
  assert "eval loss" in capsys.readouterr().out
  cfg = load_run_config(out)
  assert cfg.model.moe_every == 1 and cfg.model.moe.expert_d_ff == dense.model.d_ff // 4
  cfg = cfg.replace_fields({"train.steps": 2})
  result = train(cfg, out, show_progress=False, devices=jax.devices()[:1])
  assert result.final_step == 2
  assert (
    main(["readme-split", "--workdir", out, "--out", str(tmp_path / "x"), "--num_experts", "2"])
    == 2
  )


@pytest.mark.slow
def test_multitask_tiny_config_trains_with_task_gates(tmp_path, data_dir):
  from moejax.data import make_train_iterator
  from moejax.training.trainer import Trainer
  from tests.helpers import load_config

  cfg = load_config("multitask_tiny")
  small = tiny_config(data_dir)
  with cfg.unlocked():
    for section in ("model", "data", "train"):
      for k, v in small[section].items():
        if k != "moe":
          cfg[section][k] = v
    cfg.model.moe.expert_d_ff = 16
    cfg.train.steps = 4
    cfg.data.num_tasks = 4
  trainer = Trainer(cfg, str(tmp_path / "mt"), show_progress=False, devices=jax.devices()[:1])
  result = trainer.run()
  assert result.final_step == 4 and np.all(np.isfinite(list(result.losses.values())))
  # the batches carry several tasks, and the trained model's output follows them
  batches = make_train_iterator(cfg.data, 0, 1)
  batch = next(b for _, b in zip(range(50), batches) if len(np.unique(b["task_id"])) > 1)
  apply = jax.jit(lambda p, t, k: trainer.exp.model.apply({"params": p}, t, task_id=k)[0])
  params = jax.device_get(trainer.state.params)
  with_tasks = apply(params, batch["inputs"], batch["task_id"])
  one_task = apply(params, batch["inputs"], np.zeros_like(batch["task_id"]))
  assert not np.allclose(with_tasks, one_task, atol=1e-4)
