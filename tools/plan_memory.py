#!/usr/bin/env python3
"""Per-device memory of a config's train step, from an AOT compile on N simulated devices.

  python tools/plan_memory.py --config configs/mixtral_like.py --devices 64 \\
      --config.mesh.data=8 --config.mesh.expert=8 --config.mesh.model=1 [--json]

No weights are materialised (abstract arrays only); see ``moejax.planning.memory``.
"""

from __future__ import annotations

import os
import sys


def _devices_from_argv(argv) -> int:
  """--devices N / --devices=N, read before jax is imported (default 8)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


# The simulated device count must be set before jax initialises its CPU backend.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count="
  f"{_devices_from_argv(sys.argv)}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/*.py file; override fields with --config.x.y=value."
)
flags.DEFINE_integer("devices", 8, "Number of simulated CPU devices (the mesh's size).")
_JSON = flags.DEFINE_bool("json", False, "Print the plan as one JSON object.")
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
  del argv
  from moejax.errors import ConfigError
  from moejax.planning import format_plan, plan_memory

  try:
    plan = plan_memory(_CONFIG.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(plan, indent=1) if _JSON.value else format_plan(plan))
  return 0


if __name__ == "__main__":
  app.run(main)
