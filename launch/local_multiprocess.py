"""Run the trainer as N local processes forming one multi-process JAX runtime on CPU.

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 2 \
      --config configs/tiny_cpu.py --workdir runs/mp -- --config.train.steps=20

The same code path as a TPU pod: ``jax.distributed.initialize`` with a local coordinator
and gloo CPU collectives; the mesh spans all processes' (simulated) devices, each process
reads its own input shard, process 0 logs. --workdir may be a path or a URI (file://,
gs://...). Each process's output goes to <log_dir>/process_<i>.log (default: the workdir
when it is local, else ./process_logs); exits non-zero if any process fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def default_log_dir(workdir: str) -> str:
  """The workdir itself when it is local (a path or file://), else ./process_logs."""
  if workdir.startswith("file://"):
    return workdir[len("file://") :]
  return "process_logs" if "://" in workdir else workdir


def launch(
  num_processes: int,
  devices_per_process: int,
  config: str,
  workdir: str,
  trainer_flags: list[str],
  timeout: float | None = None,
  log_dir: str | None = None,
) -> list[int]:
  """Starts the processes, waits for all, returns their exit codes."""
  log_dir = log_dir or default_log_dir(workdir)
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  # The caller's other XLA flags are kept; the simulated device count is ours.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  procs, logs = [], []
  for i in range(num_processes):
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    cmd = [
      sys.executable,
      "-m",
      "moejax.train",
      f"--config={config}",
      f"--workdir={workdir}",
      "--distributed",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
      "--noprogress",
      *trainer_flags,
    ]
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  codes = []
  try:
    for p in procs:
      codes.append(p.wait(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  return codes


def main() -> int:
  argv = sys.argv[1:]
  trainer_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=2)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="run directory: a path or a URI")
  p.add_argument("--log_dir", default=None, help="process logs (default: see above)")
  args = p.parse_args(argv)
  log_dir = args.log_dir or default_log_dir(args.workdir)
  codes = launch(
    args.num_processes,
    args.devices_per_process,
    args.config,
    args.workdir,
    trainer_flags,
    log_dir=log_dir,
  )
  for i, code in enumerate(codes):
    print(f"process {i}: exit {code} (log: {log_dir}/process_{i}.log)")
  return max(codes, default=0)


if __name__ == "__main__":
  sys.exit(main())
