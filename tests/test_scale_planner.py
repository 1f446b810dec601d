"""The memory planner: per-device byte counts against a hand computation, XLA's figures,
and (slow) the acceptance sizes of the Mixtral / DeepSeek configs on 64 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moejax.planning import TARGETS_GIB, format_plan, plan_memory
from moejax.training.state import count_params
from tests.helpers import REPO, TINY_FLAGS, tiny_config, xla_flags

GIB = 2**30


def _tiny(fsdp: bool):
  cfg = tiny_config("unused", mesh=(8, 1, 1))
  with cfg.unlocked():
    cfg.train.fsdp = fsdp
  return cfg


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_plan_bytes_match_hand_computation(fsdp):
  cfg = _tiny(fsdp)
  plan = plan_memory(cfg)
  from moejax.training.experiment import build_experiment

  n = count_params(build_experiment(cfg).abstract_state.params)
  # float32 params; with FSDP every leaf has a d_model=32 axis split over the 8 devices.
  assert plan["params_bytes"] == 4 * n // (8 if fsdp else 1)
  assert plan["gradient_bytes"] == plan["params_bytes"]
  # AdamW: two moments shaped like the params, plus scalar step counters.
  assert 0 <= plan["optimizer_bytes"] - 2 * plan["params_bytes"] <= 64
  assert plan["temp_bytes"] > 0
  assert plan["total_bytes"] >= plan["params_bytes"] + plan["optimizer_bytes"]
  assert plan["devices"] == 8 and plan["mesh"] == {"data": 8, "expert": 1, "model": 1}
  assert set(plan["fits"]) == set(TARGETS_GIB) and all(plan["fits"].values())
  assert "total_bytes" in format_plan(plan)


def _tool(*args, timeout=1200, fast_compile=False):
  """The CLI's stdout; `fast_compile`: the tests' XLA flags (for runs not about the plan's
  numbers), else XLA's defaults."""
  env = dict(os.environ, XLA_FLAGS=xla_flags() if fast_compile else "", PYTHONPATH=REPO)
  out = subprocess.run(
    [sys.executable, os.path.join(REPO, "tools", "plan_memory.py"), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    cwd=REPO,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


ACCEPTANCE_FLAGS = [
  "--devices",
  "64",
  "--config.mesh.data=8",
  "--config.mesh.expert=8",
  "--config.mesh.model=1",
  "--config.data.global_batch_size=64",
  "--json",
]


@pytest.mark.slow
def test_mixtral_fits_per_device_budget_and_scan_keeps_compile_time_flat():
  config = os.path.join(REPO, "configs", "mixtral_like.py")
  plan = json.loads(_tool("--config", config, *ACCEPTANCE_FLAGS))
  assert plan["params_bytes"] + plan["optimizer_bytes"] + plan["gradient_bytes"] <= 16 * GIB
  assert plan["total_bytes"] <= 95 * GIB
  four = json.loads(_tool("--config", config, *ACCEPTANCE_FLAGS, "--config.model.num_layers=4"))
  assert plan["compile_s"] <= 2 * four["compile_s"]


@pytest.mark.slow
def test_deepseek_fits_per_device_budget():
  plan = json.loads(
    _tool("--config", os.path.join(REPO, "configs", "deepseek_like.py"), *ACCEPTANCE_FLAGS)
  )
  assert plan["total_bytes"] <= 95 * GIB


def test_cli_plans_a_small_config_on_the_requested_devices_and_rejects_bad_fields():
  config = os.path.join(REPO, "configs", "tiny_cpu.py")
  plan = json.loads(
    _tool(
      "--config",
      config,
      "--devices",
      "2",
      "--config.mesh.data=2",
      *TINY_FLAGS,
      "--json",
      fast_compile=True,
    )
  )
  assert plan["devices"] == 2 and plan["mesh"] == {"data": 2, "expert": 1, "model": 1}
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO)
  bad = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "tools", "plan_memory.py"),
      "--config",
      config,
      "--config.train.microbatches=3",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=REPO,
  )
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "train.microbatches=3 is invalid" in bad.stderr
