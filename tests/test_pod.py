"""Pod readiness: URI workdirs, one trainer per workdir, resume hygiene, divergence limits,
MFU, tools on bad runs."""

import json
import os
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend

from moejax.config import ExperimentConfig
from moejax.convert import cli as convert_cli
from moejax.errors import ConfigError
from moejax.training import flops as flops_lib
from moejax.training.lock import LOCK_FILE, WorkdirLock, WorkdirLocked
from moejax.training.metrics_log import MetricsWriter
from moejax.training.paths import as_path
from moejax.training.resume import param_shapes
from moejax.training.trainer import Trainer, train
from moejax.training.workdir import load_run_config, restore_state
from tests.helpers import REPO, tiny_config


def _one():
  return jax.devices()[:1]


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// served by fsspec's in-memory filesystem: object-store semantics, offline."""
  memory = fsspec.filesystem("memory")
  memory.store.clear()
  memory.pseudo_dirs.clear()
  memory.pseudo_dirs.append("")
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: memory)
  return memory


def _config(data_dir, **kw):
  """tiny_config as an HF-Mixtral-exportable model (every layer MoE, renormalised top-k)."""
  cfg = tiny_config(data_dir, router_order="topk_softmax", **kw)
  with cfg.unlocked():
    cfg.model.first_moe_layer = 0
    cfg.train.eval_every = 0  # one compile less
  return cfg


@pytest.fixture(scope="module")
def uri_run(tmp_path_factory, data_dir):
  """A 2-step run in a file:// URI workdir, checkpoint every step, steps 1..1 profiled."""
  workdir = "file://" + str(tmp_path_factory.mktemp("uri") / "run")
  cfg = _config(data_dir, steps=2, checkpoint_every=1, mesh=(-1, 1, 1))  # tools: 8 devices
  result = train(cfg, workdir, show_progress=False, devices=_one(), profile_steps=(1, 1))
  return workdir[len("file://") :], cfg, result


def _file_bytes(directory) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


# ------------------------------------------------------------------------------ paths


def test_uri_is_never_made_local():
  assert str(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert str(as_path("file:///tmp/x")) == "/tmp/x"
  assert str(as_path("rel/dir")) == os.path.join(os.getcwd(), "rel/dir")


def test_uri_workdir_trains_checkpoints_profiles_and_writes_only_through_it(uri_run):
  workdir, _, result = uri_run
  assert result.final_step == 2 and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
    "1",
    "2",
  ]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["run_id"] for r in records} == {result.run_id}
  train_records = [r for r in records if "loss" in r]
  assert all(0 < r["mfu"] < 1 and r["tflops_per_device"] > 0 for r in train_records)
  assert all("max_expert_load" in r and "min_expert_load" in r for r in train_records)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE))  # released at the end
  assert not os.path.exists("file:")  # no local folder named after the scheme


def test_metrics_on_an_object_store_are_rewritten_not_appended(fake_gcs):
  writer = MetricsWriter("gs://bucket/run", run_id="r1", flush_secs=0.0)
  for step in (1, 2, 3):
    writer.write({"step": step, "loss": float(step)})
  writer.close()
  text = as_path("gs://bucket/run/metrics.jsonl").read_text()
  assert [json.loads(l)["step"] for l in text.splitlines()] == [1, 2, 3]
  resumed = MetricsWriter("gs://bucket/run", run_id="r2", flush_secs=1e9)
  assert resumed.truncate_after(2) == 1
  resumed.write({"step": 3, "loss": 3.5})
  resumed.close()
  records = [
    json.loads(l) for l in as_path("gs://bucket/run/metrics.jsonl").read_text().splitlines()
  ]
  assert [(r["step"], r["run_id"]) for r in records] == [(1, "r1"), (2, "r1"), (3, "r2")]
  assert not os.path.exists("gs:")


# ------------------------------------------------------------------------------ lock


@pytest.mark.parametrize("where", ["local", "gs"])
def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path, where, request):
  workdir = str(tmp_path / "w") if where == "local" else "gs://bucket/w"
  if where == "gs":
    request.getfixturevalue("fake_gcs")
  first = WorkdirLock(workdir, "hostA:1:run-a", stale_after_s=60, settle_s=0.0)
  first.acquire()
  second = WorkdirLock(workdir, "hostB:2:run-b", stale_after_s=60, settle_s=0.0)
  with pytest.raises(WorkdirLocked, match="hostA:1:run-a"):
    second.acquire()
  first._stop.set()  # the first owner dies: no more heartbeats
  first._thread.join()
  stale = json.loads((as_path(workdir) / LOCK_FILE).read_text())
  stale["heartbeat"] = time.time() - 61
  (as_path(workdir) / LOCK_FILE).write_text(json.dumps(stale))
  second.acquire()
  assert second.read()["owner"] == "hostB:2:run-b"
  second.release()
  assert not (as_path(workdir) / LOCK_FILE).exists()


def test_second_trainer_on_a_live_workdir_is_refused_before_touching_anything(uri_run):
  workdir, cfg, _ = uri_run
  before = _file_bytes(workdir)
  live = WorkdirLock(workdir, "otherhost:42:live-run", stale_after_s=60)
  live.acquire()
  try:
    other = _config(cfg.data.data_dir, steps=4, learning_rate=5e-3, checkpoint_every=1)
    with pytest.raises(WorkdirLocked, match="otherhost:42:live-run"):
      train(other, workdir, show_progress=False, devices=_one())
    after = _file_bytes(workdir)
    after.pop(LOCK_FILE), before.pop(LOCK_FILE, None)
    assert after == before  # checkpoints, config.json, metrics byte-identical
  finally:
    live.release()


# ------------------------------------------------------------------------------ resume


def test_shape_change_on_resume_is_one_line_naming_the_field(uri_run):
  workdir, cfg, _ = uri_run
  changed = _config(cfg.data.data_dir, steps=4, checkpoint_every=1, num_experts=8)
  with pytest.raises(ConfigError) as info:
    train(changed, workdir, show_progress=False, devices=_one())
  message = str(info.value)
  assert message.startswith("model.moe.num_experts=8 differs from the run's 4"), message
  assert "\n" not in message and len(message) < 300
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE))


def test_resume_drops_replayed_records_and_stamps_run_ids(tmp_path, uri_run):
  import shutil

  src, cfg, first = uri_run
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))  # killed after step 2's record
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # a replayed step, a torn line
  longer = _config(cfg.data.data_dir, steps=3, checkpoint_every=1)
  second = train(longer, workdir, show_progress=False, devices=_one())
  assert sorted(second.losses) == [2, 3]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)) == [1, 2, 3]
  assert [r["run_id"] for r in records if "loss" in r] == [first.run_id] + [second.run_id] * 2
  assert load_run_config(workdir).train.steps == 3


def test_param_shapes_see_expert_count_but_not_train_fields(data_dir):
  base = tiny_config(data_dir)
  more = tiny_config(data_dir, num_experts=8)
  steps = tiny_config(data_dir, steps=99)
  assert param_shapes(base) == param_shapes(steps) != param_shapes(more)


# ------------------------------------------------------------------------------ init_from


def test_init_from_starts_at_step_zero_with_the_source_params(tmp_path, uri_run):
  src, cfg, _ = uri_run
  finetune = _config(cfg.data.data_dir, steps=3, learning_rate=1e-4)
  trainer = Trainer(
    finetune, str(tmp_path / "ft"), show_progress=False, devices=_one(), init_from=src
  )
  try:
    source, _, step, _ = restore_state(cfg, src, devices=_one())
    assert step == 2 and trainer.start == 0 and int(trainer.state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, trainer.state.params, source.params)
    mu = jax.tree.leaves(trainer.state.opt_state)
    assert all(not np.any(np.asarray(x)) for x in mu if np.ndim(x) > 0)  # fresh moments
  finally:
    trainer.close()


# ------------------------------------------------------------------------------ config


def test_batch_not_dividing_the_devices_is_a_config_error_before_writing(tmp_path, data_dir):
  cfg = tiny_config(data_dir, mesh=(8, 1, 1))
  with cfg.unlocked():
    cfg.data.global_batch_size = 4
  with pytest.raises(ConfigError, match=r"data\.global_batch_size=4 .*8 batch shards"):
    train(cfg, str(tmp_path / "run"), show_progress=False)
  assert not os.path.exists(tmp_path / "run")


def test_unknown_config_field_exits_2_before_writing(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config=configs/tiny_cpu.py",
      f"--workdir={workdir}",
      "--config.model.moe.num_expertz=4",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "model.moe.num_expertz is not a config field" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and not workdir.exists()


# ------------------------------------------------------------------------------ MFU


def _abstract_params(cfg):
  exp = ExperimentConfig.from_config(cfg)
  tokens = jax.numpy.zeros((1, exp.data.seq_len), jax.numpy.int32)
  from moejax.models import Transformer

  tree = jax.eval_shape(lambda: Transformer(exp.model).init(jax.random.key(0), tokens))
  return tree["params"], exp


def test_dense_mfu_is_6_n_tokens_over_time_and_peak(data_dir):
  cfg = tiny_config(data_dir)
  with cfg.unlocked():
    cfg.model.moe_every = 0
  params, exp = _abstract_params(cfg)
  m, L, T = exp.model, exp.model.num_layers, exp.data.seq_len
  d, h, hkv, dh, ff, v = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff, m.vocab_size
  # N: the matmul weights a token passes through (PaLM app. B): q, k, v, o, gated FFN, LM head
  n = L * (2 * d * h * dh + 2 * d * hkv * dh + 3 * d * ff) + d * v
  attention = 12 * L * h * dh * T  # QK^T and AV over the full sequence, forward + backward
  tokens, seconds, devices, peak = 8 * T * 10, 2.5, 4, 1e12
  flops = flops_lib.model_flops(params, m, T)
  got = flops_lib.throughput(flops.train_flops_per_token(), tokens / seconds, devices, peak)
  assert got["mfu"] == pytest.approx((6 * n + attention) * tokens / seconds / devices / peak)


def test_moe_flops_count_only_the_experts_a_token_uses(data_dir):
  cfg = tiny_config(data_dir, router="null_experts", num_null_experts=2)
  params, exp = _abstract_params(cfg)
  moe = exp.model.moe
  flops = flops_lib.model_flops(params, exp.model, exp.data.seq_len)
  one_expert = 3 * exp.model.d_model * moe.expert_d_ff  # wi_gate, wi_up, wo
  moe_layers = sum(exp.model.is_moe_layer(i) for i in range(exp.model.num_layers))
  assert flops.expert_params == one_expert * moe_layers
  # a measured 1.25 real experts per token (null experts compute nothing)
  gap = flops.train_flops_per_token(1.25) - flops.train_flops_per_token(0.0)
  assert gap == pytest.approx(6 * 1.25 * one_expert * moe_layers)
  assert flops.train_flops_per_token() == flops.train_flops_per_token(moe.top_k)


def test_peak_table_knows_the_accelerators():
  class Dev:
    platform = "tpu"

    def __init__(self, kind):
      self.device_kind = kind

  assert flops_lib.peak_flops(Dev("TPU v5 lite")) == 197e12
  assert flops_lib.peak_flops(Dev("TPU v5p")) == 459e12
  assert flops_lib.peak_flops(Dev("TPU v6 lite")) == 918e12
  assert flops_lib.peak_flops(Dev("TPU v4")) == 275e12
  assert flops_lib.peak_flops(Dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert flops_lib.peak_flops(Dev("NVIDIA A100-SXM4-80GB")) == 312e12
  assert flops_lib.peak_flops(Dev("NVIDIA H200")) == 989e12
  assert flops_lib.peak_flops(Dev("mystery")) is None
  assert flops_lib.peak_flops(jax.devices("cpu")[0]) > 1e6  # measured


# ------------------------------------------------------------------------------ tools


def test_tools_name_garbage_files_in_one_line_and_export_world_readable(tmp_path, uri_run, capsys):
  import shutil

  src, _, _ = uri_run
  out = tmp_path / "hf"
  argv = ["export-hf", "--workdir", src, "--out", str(out), "--allow_inexact"]  # capacity run
  assert convert_cli.main(argv) == 0
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o755 & ~umask
  assert {os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {0o644 & ~umask}
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  (bad / "config.json").write_text("{ not json")
  with pytest.raises(ConfigError, match=str(bad / "config.json")):
    load_run_config(str(bad))
  shutil.copy(os.path.join(src, "config.json"), bad / "config.json")
  for step in ("1", "2"):
    for root, _, files in os.walk(bad / "checkpoints" / step / "state"):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  capsys.readouterr()
  rc = convert_cli.main(["export-hf", "--workdir", str(bad), "--out", str(tmp_path / "hf2")])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "no usable checkpoint" in err and str(bad / "checkpoints" / "2") in err
  assert not (tmp_path / "hf2").exists()


def test_a_runs_config_json_is_a_config_file(uri_run):
  from moejax.training import json_config
  from moejax.training.workdir import load_config_file

  src, cfg, _ = uri_run
  loaded = load_config_file(os.path.join(src, "config.json"))
  assert loaded.to_dict() == json_config.get_config(os.path.join(src, "config.json")).to_dict()
  assert ExperimentConfig.from_config(loaded).model == ExperimentConfig.from_config(cfg).model


@pytest.mark.slow
def test_cli_fine_tunes_from_a_run_with_its_config_json(tmp_path, uri_run):
  src, cfg, _ = uri_run
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      f"--workdir={tmp_path / 'ft'}",
      f"--init_from={src}",
      "--config",
      os.path.join(src, "config.json"),
      "--config.train.steps=3",
      "--config.train.learning_rate=1e-4",
      "--noprogress",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", MOEJAX_DATA_DIR=cfg.data.data_dir),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Initialised from step 2" in out.stderr and "finished at step 3" in out.stdout
  assert load_run_config(str(tmp_path / "ft")).train.learning_rate == 1e-4
