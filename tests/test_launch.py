"""The launchers: two local processes form one JAX runtime; the TPU command lines; debug."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, TINY_FLAGS, xla_flags

REPO_PATH = pathlib.Path(REPO)


def _env(data_dir: str, devices: int) -> dict:
  return dict(
    os.environ,
    MOEJAX_DATA_DIR=data_dir,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags(devices),
  )


def test_two_processes_form_one_mesh_and_agree_on_the_loss(tmp_path, data_dir):
  from moejax.data import prepare_tiny_corpus

  prepare_tiny_corpus(data_dir)  # once, before the processes start
  workdir = tmp_path / "mp"
  cmd = [
    sys.executable,
    os.path.join(REPO, "launch", "local_multiprocess.py"),
    "--num_processes=2",
    "--devices_per_process=2",
    "--config=configs/tiny_cpu.py",
    f"--workdir=file://{workdir}",  # a URI workdir, as on a pod (gs://...)
    "--",
    *TINY_FLAGS,
    "--config.model.num_layers=1",  # one MoE layer: experts over the 'expert' axis
    "--config.model.first_moe_layer=0",
    "--config.train.steps=3",
    "--config.train.checkpoint_every=3",
    "--config.mesh.data=2",
    "--config.mesh.expert=2",
    "--report_losses",
  ]
  out = subprocess.run(
    cmd, cwd=REPO, env=_env(data_dir, 2), capture_output=True, text=True, timeout=400
  )
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
  assert out.returncode == 0, out.stdout + "\n".join(l[-3000:] for l in logs)
  reports = []
  for log in logs:
    assert "4 devices" in log and "2 processes" in log, log[-2000:]
    line = [l for l in log.splitlines() if l.startswith("losses: ")][-1]
    reports.append(json.loads(line[len("losses: ") :]))
  assert reports[0] == reports[1]  # every process computed the same global loss
  losses = np.array([reports[0][str(s)] for s in (1, 2, 3)])
  assert np.all(np.isfinite(losses))
  assert os.path.isdir(workdir / "checkpoints" / "3")
  # only process 0 writes metrics
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert len({r["run_id"] for r in records}) == 1
  assert not (workdir / "trainer.lock").exists()  # process 0 held it and released it
  assert not (REPO_PATH / "file:").exists()


def test_tpu_pod_launcher_prints_one_command_for_every_host():
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "launch", "tpu_pod.py"),
      "--tpu=my-v4-32",
      "--zone=us-central2-b",
      "--config=configs/mixtral_like.py",
      "--workdir=gs://bucket/run",
      "--",
      "--config.train.steps=10",
    ],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2  # setup, then train
  assert all("--worker=all" in l and "my-v4-32" in l for l in lines)
  assert "moejax.train --distributed" in lines[1]
  assert "--config.train.steps=10" in lines[1] and "gs://bucket/run" in lines[1]


@pytest.mark.slow  # the two-process launcher test covers the launch path by default
@pytest.mark.parametrize("disable_jit", [False, True])
def test_single_device_debug_launcher_trains(tmp_path, data_dir, disable_jit):
  env = _env(data_dir, 1)
  env["XLA_FLAGS"] = xla_flags()
  env["PYTHON"] = sys.executable
  if disable_jit:
    env["DISABLE_JIT"] = "1"
  steps = 1 if disable_jit else 2
  out = subprocess.run(
    [
      "bash",
      os.path.join(REPO, "launch", "single_gpu.sh"),
      str(tmp_path / "dbg"),
      f"--config.train.steps={steps}",
      "--config.train.eval_every=0",
      "--noprogress",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"finished at step {steps}" in out.stdout
  assert "1 devices" in out.stderr
