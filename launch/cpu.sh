#!/usr/bin/env bash
# Train the tiny MoE LM on the CPU (the README's main job).
#   launch/cpu.sh [WORKDIR] [extra trainer flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/tiny}"
shift || true
exec "${PYTHON:-.venv/bin/python}" -m moejax.train --config configs/tiny_cpu.py \
  --workdir "$workdir" "$@"
