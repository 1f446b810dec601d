"""Command-line trainer.

  python -m moejax.train --config configs/tiny_cpu.py --workdir /tmp/moejax_run \
      [--config.model.moe.num_experts=16] [--noresume] [--max_steps N]

Multi-host (TPU pods, or several local processes): pass --distributed; with no
coordinator flags ``jax.distributed.initialize()`` auto-detects the TPU slice, otherwise
--coordinator_address/--num_processes/--process_id are used (see launch/).
Exit codes: 0 done or preempted-and-saved, 2 bad config, 3 diverged (NaN/Inf).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a configs/*.py file (default: the workdir's config.json).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl.")
_RESUME = flags.DEFINE_bool("resume", True, "Resume from the newest usable checkpoint.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps this run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
  "cpu_collectives", "gloo", "CPU collectives backend for multi-process CPU runs."
)
_DEBUG_NANS = flags.DEFINE_bool("debug_nans", False, "jax_debug_nans: raise at the first NaN.")
_DISABLE_JIT = flags.DEFINE_bool("disable_jit", False, "Run op by op (slow; for debugging).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (else log lines).")
_REPORT_LOSSES = flags.DEFINE_bool(
  "report_losses",
  False,
  "At the end, print 'losses: {step: loss}' JSON (every process; for scripts comparing runs).",
)


def initialize_runtime() -> None:
  """Debug switches and multi-process initialisation, before any computation."""
  import jax

  if _DEBUG_NANS.value:
    jax.config.update("jax_debug_nans", True)
  if _DISABLE_JIT.value:
    jax.config.update("jax_disable_jit", True)
  if _DISTRIBUTED.value:
    # Only affects the CPU client; needed for multi-process CPU runs (tests, laptops).
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    kwargs = {}
    if _COORDINATOR.value:
      kwargs = dict(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
      )
    jax.distributed.initialize(**kwargs)


def main(argv) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax"):  # Orbax's per-save chatter, backend probing
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _WORKDIR.value is None:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  config = _CONFIG.value
  if config is None:  # continue a run (e.g. one written by tools/) with its own config
    from moejax.training.workdir import load_run_config

    try:
      config = load_run_config(_WORKDIR.value)
    except FileNotFoundError as e:
      print(f"error: no --config given and {e}", file=sys.stderr)
      return 2
  initialize_runtime()
  from moejax.errors import ConfigError
  from moejax.training.trainer import TrainingDiverged, train

  try:
    result = train(
      config,
      _WORKDIR.value,
      resume=_RESUME.value,
      max_steps=_MAX_STEPS.value,
      show_progress=_PROGRESS.value,
    )
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(str(e), file=sys.stderr)
    return 3
  last = result.losses.get(result.final_step)
  print(
    f"finished at step {result.final_step} ({result.stopped_by}); "
    f"last loss {last if last is None else round(last, 4)}; "
    f"eval { ({k: round(v, 4) for k, v in result.eval_losses.items()}) }; "
    f"checkpoints in {_WORKDIR.value}/checkpoints"
  )
  if _REPORT_LOSSES.value:
    print("losses: " + json.dumps({str(k): v for k, v in sorted(result.losses.items())}))
  return 0


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
