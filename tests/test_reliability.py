"""Reliability: preemption, kill -9, corrupt checkpoints, NaN, hostile configs lose nothing.

The subprocess tests run the real CLI (``python -m moejax.train``) on one CPU device and
compare every logged loss against an uninterrupted reference run: a resumed run must
reproduce it exactly, whatever happened in between.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.training.checkpoint import Checkpointer, CheckpointError
from moejax.training.trainer import TrainingDiverged, train
from tests.helpers import REPO, TINY_FLAGS, tiny_config, xla_flags

STEPS = 40
CKPT_EVERY = 5


def _env(data_dir: str, **extra) -> dict:
  env = dict(os.environ, MOEJAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", **extra)
  env["XLA_FLAGS"] = xla_flags()  # one CPU device, the same program in every run
  env.pop("MOEJAX_CRASH_AT", None)
  env.update(extra)
  return env


def _cmd(workdir, *extra) -> list[str]:
  return [
    sys.executable,
    "-m",
    "moejax.train",
    "--config=configs/tiny_cpu.py",
    f"--workdir={workdir}",
    "--noprogress",
    *TINY_FLAGS,
    f"--config.train.steps={STEPS}",
    f"--config.train.checkpoint_every={CKPT_EVERY}",
    "--config.train.async_checkpointing=true",
    "--config.mesh.data=1",
    *extra,
  ]


def _run(workdir, data_dir, *extra, timeout=300, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    _cmd(workdir, *extra),
    cwd=REPO,
    env=_env(data_dir, **env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _records(workdir) -> dict[int, list[float]]:
  """{step: [loss of every record of that step]}; a line torn by a kill is skipped."""
  out: dict[int, list[float]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  for line in open(path):
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in r:
      out.setdefault(int(r["step"]), []).append(r["loss"])
  return out


def _wait_for_step(proc, workdir, step: int, timeout=200) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(
        f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
      )
    if max(_records(workdir), default=0) >= step:
      return
    time.sleep(0.01)
  raise AssertionError(f"step {step} not reached in {timeout}s")


def _assert_matches_reference(workdir, reference: dict[int, float]) -> None:
  records = _records(workdir)
  assert sorted(records) == list(range(1, STEPS + 1))
  for step, losses in records.items():
    assert all(loss == reference[step] for loss in losses), (step, losses, reference[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> dict[int, float]:
  from moejax.data import prepare_tiny_corpus

  prepare_tiny_corpus(data_dir)
  workdir = tmp_path_factory.mktemp("reference")
  out = _run(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  records = _records(workdir)
  assert sorted(records) == list(range(1, STEPS + 1))
  return {step: losses[0] for step, losses in records.items()}


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, data_dir, reference):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    _cmd(workdir),
    cwd=REPO,
    env=_env(data_dir),
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  _wait_for_step(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=200)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted:SIGTERM" in stdout
  stopped_at = max(_records(workdir))
  assert stopped_at < STEPS
  ckpt = Checkpointer(str(workdir / "checkpoints"), keep=100, async_save=False)
  assert ckpt.all_steps()[-1] == stopped_at  # the interrupted step was saved
  ckpt.close()
  out = _run(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resumed from checkpoint step {stopped_at}" in out.stderr
  _assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_second_trainer_on_a_live_workdir_exits_2_and_the_first_run_is_untouched(
  tmp_path, data_dir
):
  workdir = tmp_path / "run"
  first = subprocess.Popen(  # long enough to still be training when the second one starts
    _cmd(workdir, "--config.train.steps=100000"),
    cwd=REPO,
    env=_env(data_dir),
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  _wait_for_step(first, workdir, 2)
  config_before = (workdir / "config.json").read_bytes()
  second = _run(
    workdir, data_dir, "--config.train.steps=100000", "--config.train.learning_rate=0.5"
  )
  assert second.returncode == 2, second.stderr[-3000:]
  assert f":{first.pid}:" in second.stderr and "is in use by trainer" in second.stderr
  assert first.poll() is None  # still training
  first.send_signal(signal.SIGTERM)
  _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-3000:]
  assert (workdir / "config.json").read_bytes() == config_before  # not the second's LR
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, len(steps) + 1)) and len({r["run_id"] for r in records}) == 1
  assert not (workdir / "trainer.lock").exists()


@pytest.mark.slow
def test_kill9_during_async_save_resumes_from_newest_complete_checkpoint(
  tmp_path, data_dir, reference
):
  workdir = tmp_path / "run"
  out = _run(workdir, data_dir, MOEJAX_CRASH_AT="during_save:10")
  assert out.returncode == -signal.SIGKILL
  out = _run(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = [l for l in out.stderr.splitlines() if "Resumed from checkpoint step" in l]
  assert resumed and int(resumed[0].split()[-3]) in (5, 10), resumed
  _assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_kill9_at_random_moments_never_loses_more_than_since_last_checkpoint(
  tmp_path, data_dir, reference
):
  workdir = tmp_path / "run"
  rng = np.random.default_rng(0)
  kill_after = sorted(rng.choice(np.arange(3, STEPS - 3), size=2, replace=False))
  for target in kill_after:
    proc = subprocess.Popen(
      _cmd(workdir),
      cwd=REPO,
      env=_env(data_dir),
      text=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    _wait_for_step(proc, workdir, int(target))
    time.sleep(float(rng.uniform(0, 0.05)))  # anywhere inside a step or a save
    proc.kill()
    proc.wait()
    reached = max(_records(workdir))
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=100, async_save=False)
    steps = ckpt.all_steps()
    ckpt.close()
    # at most one checkpoint interval plus the one save still in flight can be lost
    assert (steps[-1] if steps else 0) >= reached - 2 * CKPT_EVERY, (steps, reached)
  out = _run(workdir, data_dir, MOEJAX_CRASH_AT=f"after_step:{STEPS - 2}")
  assert out.returncode == -signal.SIGKILL
  out = _run(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_matches_reference(workdir, reference)


def _largest_file(directory) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize(
  "damage",
  [
    "flip_bytes",
    pytest.param("truncate", marks=pytest.mark.slow),
    pytest.param("remove_state", marks=pytest.mark.slow),
  ],
)
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, data_dir, reference, damage):
  workdir = tmp_path / "run"
  out = _run(workdir, data_dir, "--max_steps=20")
  assert out.returncode == 0, out.stderr[-3000:]
  newest = workdir / "checkpoints" / "20"
  assert newest.is_dir()
  if damage == "flip_bytes":
    victim = _largest_file(newest / "state")
    with open(victim, "r+b") as f:
      size = os.path.getsize(victim)
      for offset in (size // 3, size // 2, 2 * size // 3):
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
  elif damage == "truncate":
    victim = _largest_file(newest / "state")
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    import shutil

    shutil.rmtree(newest / "state")
  out = _run(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "checkpoint step 20" in out.stderr and "unusable" in out.stderr
  assert "Fell back to checkpoint step 15" in out.stderr
  _assert_matches_reference(workdir, reference)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=2, checkpoint_every=2, eval_every=0)
  one = jax.devices()[:1]
  train(cfg, str(tmp_path / "run"), show_progress=False, devices=one)
  import shutil

  shutil.rmtree(tmp_path / "run" / "checkpoints" / "2" / "state")
  with pytest.raises(CheckpointError, match="no usable checkpoint"):
    train(cfg, str(tmp_path / "run"), show_progress=False, devices=one)


def test_nan_stops_with_step_and_layer_metrics_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=30, checkpoint_every=1, learning_rate=1e9)
  with cfg.unlocked():
    cfg.train.warmup_steps = 0
    cfg.train.grad_clip_norm = 1e30
  one = jax.devices()[:1]
  with pytest.raises(TrainingDiverged) as info:
    train(cfg, str(tmp_path / "run"), show_progress=False, devices=one)
  message = str(info.value)
  bad_step = int(message.split("at step ")[1].split()[0])
  assert "router/layers_1/" in message and "nan_policy='skip'" in message
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=100, async_save=False)
  steps = ckpt.all_steps()
  ckpt.close()
  assert steps and steps[-1] == bad_step - 1  # every finite step saved, the bad one not
  # the last good checkpoint restores (checksums verified) and holds finite params
  from moejax.training.workdir import restore_state

  state, _, step, _ = restore_state(cfg, str(tmp_path / "run"), devices=one)
  assert step == bad_step - 1
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_nan_skip_policy_keeps_params_finite_counts_skips_and_aborts_when_diverged(
  tmp_path, data_dir
):
  cfg = tiny_config(data_dir, steps=12, checkpoint_every=1, learning_rate=1e9)
  with cfg.unlocked():
    cfg.train.warmup_steps = 0
    cfg.train.grad_clip_norm = 1e30
    cfg.train.nan_policy = "skip"
    cfg.train.max_consecutive_skips = 3
  one = jax.devices()[:1]
  with pytest.raises(TrainingDiverged, match=r"3 consecutive .*train\.max_consecutive_skips=3"):
    train(cfg, str(tmp_path / "run"), show_progress=False, devices=one)
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  skipped = [r["step"] for r in records if r.get("skipped") == 1.0]
  # the run of skips that aborted (its last step raises before it is logged)
  assert len(skipped) >= 2 and skipped[-2:] == [skipped[-1] - 1, skipped[-1]], skipped
  assert records[-1]["skipped_steps"] == len(skipped)
  from moejax.training.workdir import restore_state

  state, _, _, _ = restore_state(cfg, str(tmp_path / "run"), devices=one)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


# ------------------------------------------------------------------------ config fuzzing

INVALID = [
  ("model.d_model", -8),
  ("model.num_layers", 0),
  ("model.num_heads", 3),
  ("model.moe.num_experts", -1),
  ("model.moe.top_k", 99),
  ("model.moe.top_k", 0),
  ("model.moe.capacity_factor", -1.0),
  ("model.moe.router", "nope"),
  ("data.seq_len", 0),
  ("data.global_batch_size", -4),
  ("train.steps", 0),
  ("train.learning_rate", -1.0),
  ("train.nan_policy", "ignore"),
  ("mesh.data", 3),
  ("mesh.expert", 0),
  ("mesh.model", 5),
]


def _compile_events():
  events = []

  def listener(name, *args, **kwargs):
    if "compile" in name:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  return events


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_config_fails_before_any_compile_naming_the_field(tmp_path, data_dir, field, value):
  cfg = tiny_config(data_dir, steps=2, mesh=(-1, 1, 1))
  section = cfg
  *parents, leaf = field.split(".")
  with cfg.unlocked():
    for p in parents:
      section = section[p]
    section[leaf] = value
  events = _compile_events()
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    train(cfg, str(tmp_path / "run"), show_progress=False)
  assert not events, f"compiled before rejecting the config: {events}"
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_experts_not_divisible_by_the_expert_axis_is_rejected(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=2, mesh=(2, 4, 1))
  with cfg.unlocked():
    cfg.model.moe.num_experts = 6
  events = _compile_events()
  with pytest.raises(ConfigError, match=r"model\.moe\.num_experts=6.*mesh\.expert=4"):
    train(cfg, str(tmp_path / "run"), show_progress=False)
  assert not events
