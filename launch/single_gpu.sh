#!/usr/bin/env bash
# Debug moejax on one GPU (or the CPU) with the same code path as a pod: a 1-device mesh.
#
#   launch/single_gpu.sh [WORKDIR] [extra trainer flags...]
#   DISABLE_JIT=1 launch/single_gpu.sh runs/debug     # op by op: Python breakpoints work
#
# Uses configs/debug.py (tiny model, every router path exercised with capacity dropping),
# --debug_nans (jax_debug_nans: re-runs the failing op un-jitted and raises at the first
# NaN), no memory preallocation so other tools can share the GPU. Inside model code use
# `jax.debug.print("router logits max {m}", m=logits.max())` or
# `jax.debug.breakpoint()`; they work under jit and shard_map.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/debug}"
shift || true
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python="${PYTHON:-.venv/bin/python}"
extra=()
if [[ "${DISABLE_JIT:-0}" == "1" ]]; then extra+=(--disable_jit); fi
exec "$python" -m moejax.train --config configs/debug.py --workdir "$workdir" \
  --debug_nans --config.mesh.data=1 --config.mesh.expert=1 --config.mesh.model=1 \
  "${extra[@]}" "$@"
