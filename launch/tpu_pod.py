"""Run the same trainer command on every host of a Cloud TPU slice.

  python launch/tpu_pod.py --tpu my-v4-64 --zone us-central2-b \
      --config configs/mixtral_like.py --workdir gs://bucket/runs/mixtral -- \
      --config.train.steps=100000            # extra trainer flags after '--'

prints the ``gcloud compute tpus tpu-vm ssh --worker=all`` command lines (setup, then
train) and runs them with --run. On each host the trainer is started with --distributed,
so ``jax.distributed.initialize()`` discovers the slice; the mesh spans every host's
chips, each host reads its own input shard (documents i % num_hosts == host index), and
only process 0 writes logs and metrics (checkpoints are written by all hosts, each its
own shards, to the shared --workdir, which must be on GCS or another shared filesystem).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def build_commands(args, trainer_flags: list[str]) -> list[list[str]]:
  """The gcloud argument vectors to run, in order."""
  ssh = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    args.tpu,
    f"--zone={args.zone}",
    "--worker=all",
  ]
  if args.project:
    ssh.append(f"--project={args.project}")
  setup = (
    f"set -e; if [ ! -d {shlex.quote(args.repo_dir)} ]; then git clone "
    f"{shlex.quote(args.repo_url)} {shlex.quote(args.repo_dir)}; fi; "
    f"cd {shlex.quote(args.repo_dir)} && git fetch -q && git checkout -q "
    f"{shlex.quote(args.ref)} && python3 -m venv .venv && .venv/bin/pip install -q "
    f"'jax[tpu]' -e ."
  )
  train = " ".join(
    [
      f"cd {shlex.quote(args.repo_dir)} &&",
      ".venv/bin/python",
      "-m",
      "moejax.train",
      "--distributed",
      "--noprogress",
      f"--config={shlex.quote(args.config)}",
      f"--workdir={shlex.quote(args.workdir)}",
      *map(shlex.quote, trainer_flags),
    ]
  )
  commands = []
  if not args.skip_setup:
    commands.append(ssh + [f"--command={setup}"])
  commands.append(ssh + [f"--command={train}"])
  return commands


def parse(argv: list[str]):
  if "--" in argv:
    cut = argv.index("--")
    argv, trainer_flags = argv[:cut], argv[cut + 1 :]
  else:
    trainer_flags = []
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tpu", required=True, help="TPU VM (slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--config", required=True, help="config file, relative to the repo")
  p.add_argument("--workdir", required=True, help="shared run dir (gs://... on TPU)")
  p.add_argument("--repo_url", default="https://github.com/moejax/moejax.git")
  p.add_argument("--repo_dir", default="moejax")
  p.add_argument("--ref", default="main", help="git ref every host checks out")
  p.add_argument("--skip_setup", action="store_true", help="hosts are already set up")
  p.add_argument("--run", action="store_true", help="run the commands (default: print)")
  return p.parse_args(argv), trainer_flags


def main(argv: list[str] | None = None) -> int:
  args, trainer_flags = parse(sys.argv[1:] if argv is None else argv)
  for command in build_commands(args, trainer_flags):
    print(shlex.join(command), flush=True)
    if args.run:
      rc = subprocess.call(command)
      if rc:
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
