"""moejax-plan-memory: per-device memory of a config's train step, from an AOT compile on N
simulated CPU devices (abstract arrays only; see ``moejax.planning.memory``).

  moejax-plan-memory --config configs/mixtral_like.py --devices 64 \\
      --config.mesh.data=8 --config.mesh.expert=8 --config.mesh.model=1 [--json]

Exit codes: 0 planned, 2 bad config.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from moejax.errors import ConfigError
from moejax.planning.memory import format_plan, plan_memory


def main(argv, config, devices: int, as_json: bool) -> int:
  del argv
  # Before anything touches a backend: N simulated CPU devices, whatever this host has.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  try:
    plan = plan_memory(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(plan, indent=1) if as_json else format_plan(plan))
  return 0


def run() -> None:
  """Console-script entry point (flags defined here, not at import: absl flags are global,
  and the trainer's module defines --config too)."""
  config = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file; override fields with --config.x.y=value."
  )
  devices = flags.DEFINE_integer("devices", 8, "Number of simulated CPU devices (the mesh's size).")
  as_json = flags.DEFINE_bool("json", False, "Print the plan as one JSON object.")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, config.value, devices.value, as_json.value))
