"""Command-line trainer.

  python -m moejax.train --config configs/tiny_cpu.py --workdir /tmp/moejax_run \
      [--config.model.moe.num_experts=16] [--noresume] [--max_steps N]
  python -m moejax.train --workdir gs://bucket/ft --init_from runs/pruned \
      --config runs/pruned/config.json --config.train.learning_rate=1e-4

Multi-host (TPU pods, or several local processes): pass --distributed; with no
coordinator flags ``jax.distributed.initialize()`` auto-detects the TPU slice, otherwise
--coordinator_address/--num_processes/--process_id are used (see launch/).
The workdir may be a local path or an object-store URI (gs://...); one trainer per workdir.
Exit codes: 0 done or preempted-and-saved; 2 bad config, workdir in use, refused resume or
unusable checkpoint (nothing written); 3 diverged (NaN/Inf, or too many skipped steps).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

# Importing these initialises no backend, so jax.distributed.initialize() below still runs
# before any computation.
from moejax import host_allocator
from moejax.config import base_config
from moejax.errors import ConfigError
from moejax.training.checkpoint import CheckpointError
from moejax.training.lock import WorkdirLocked
from moejax.training.paths import as_path
from moejax.training.trainer import TrainingDiverged, train
from moejax.training.workdir import load_config_file, load_run_config

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
_HOST_ALLOCATOR = flags.DEFINE_enum(
  "host_allocator",
  "auto",
  host_allocator.MODES,
  "keep: reuse freed host memory (XLA:CPU's per-step temporaries are not page-faulted "
  "afresh each step; see moejax/host_allocator.py); system: glibc's defaults; auto: keep "
  "when JAX runs on the CPU.",
)
_DEBUG_NANS = flags.DEFINE_bool("debug_nans", False, "jax_debug_nans: raise at the first NaN.")
_DISABLE_JIT = flags.DEFINE_bool("disable_jit", False, "Run op by op (slow; for debugging).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (else log lines).")
_INIT_FROM = flags.DEFINE_string(
  "init_from",
  None,
  "A run (path or URI) whose newest params start this run if it has no checkpoint yet "
  "(fine-tuning a run written by moejax-convert / moejax-experts); fresh optimizer state.",
)
_PROFILE_STEPS = flags.DEFINE_string(
  "profile_steps", None, "'a:b': write a jax.profiler trace of steps a..b to <workdir>/profile."
)
_REPORT_LOSSES = flags.DEFINE_bool(
  "report_losses",
  False,
  "At the end, print 'losses: {step: loss}' JSON (every process; for scripts comparing runs).",
)


def initialize_runtime() -> None:
  """Host allocator, debug switches and multi-process initialisation, before any
  computation."""
  host_allocator.configure(_HOST_ALLOCATOR.value)
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


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
  """'a:b' -> (a, b) with 1 <= a <= b; ValueError otherwise."""
  if not text:
    return None
  first, sep, last = text.partition(":")
  if not (sep and first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
    raise ValueError(f"--profile_steps={text!r} is invalid: expected 'a:b' with 1 <= a <= b")
  return int(first), int(last)


def main(argv) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax"):  # Orbax's per-save chatter, backend probing
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _WORKDIR.value is None:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  try:
    profile_steps = parse_profile_steps(_PROFILE_STEPS.value)
    config = _CONFIG.value
    if config is None:  # continue a run (e.g. one written by tools/) with its own config
      own = (as_path(_WORKDIR.value) / "config.json").exists() or not _INIT_FROM.value
      config = load_run_config(_WORKDIR.value if own else _INIT_FROM.value)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  initialize_runtime()
  try:
    result = train(
      config,
      _WORKDIR.value,
      resume=_RESUME.value,
      max_steps=_MAX_STEPS.value,
      show_progress=_PROGRESS.value,
      init_from=_INIT_FROM.value,
      profile_steps=profile_steps,
    )
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except (WorkdirLocked, CheckpointError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(str(e), file=sys.stderr)
    return 3
  last = result.losses.get(result.final_step)
  print(
    f"finished at step {result.final_step} ({result.stopped_by}); "
    f"last loss {last if last is None else round(last, 4)}; "
    f"eval { ({k: round(v, 4) for k, v in result.eval_losses.items()}) }; "
    f"skipped steps {result.skipped_steps}; run id {result.run_id}; "
    f"checkpoints in {_WORKDIR.value}/checkpoints"
  )
  if _REPORT_LOSSES.value:
    print("losses: " + json.dumps({str(k): v for k, v in sorted(result.losses.items())}))
  return 0


def _json_config_argv(argv: list[str]) -> list[str]:
  """``--config=x.json`` (a run's config.json) -> ``--config=<json_config.py>:x.json``."""
  loader = os.path.join(os.path.dirname(__file__), "training", "json_config.py")
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config=") and arg.endswith(".json"):
      out[i] = f"--config={loader}:{arg[len('--config=') :]}"
    elif arg == "--config" and i + 1 < len(out) and out[i + 1].endswith(".json"):
      out[i + 1] = f"{loader}:{out[i + 1]}"
  return out


def _unknown_override(argv: list[str]) -> str | None:
  """The first ``--config.a.b`` override naming no field of the config file (or None)."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = load_config_file(path.split(":", 1)[-1] if path else None) if path else base_config()
  except Exception:  # noqa: BLE001 — only used to word an error message
    config = base_config()
  for arg in argv:
    if arg.startswith("--config."):
      dotted = arg[len("--config.") :].split("=", 1)[0]
      node = config
      for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
          return dotted
        node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a config file or override error exits 2 naming the field."""
  try:
    return flags.FLAGS(_json_config_argv(argv))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
    field = _unknown_override(argv[1:])
    if field is not None:
      print(f"config error: {field} is not a config field (--config.{field})", file=sys.stderr)
    else:
      print(f"config error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
