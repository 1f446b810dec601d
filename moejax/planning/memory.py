"""Per-device memory of a training step, from an ahead-of-time compile with abstract arrays.

The train state is ``jax.eval_shape``d with its real shardings and the jitted step compiled
from ``jax.ShapeDtypeStruct`` inputs: params / optimizer bytes are per-device shard sizes,
temp and total bytes XLA's ``compiled.memory_analysis()`` figures (upper bounds on
simulated CPU devices, which keep bfloat16 buffers as float32).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from moejax.training.experiment import build_experiment
from moejax.training.step import make_train_step

# Per-chip accelerator memory (GiB) a plan is checked against.
TARGETS_GIB: dict[str, float] = {
  "TPU v5e": 16,
  "TPU v5p": 95,
  "TPU v6e": 32,
  "H100": 80,
  "H200": 141,
}
GIB = 2**30


def sharded_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs / arrays carrying NamedShardings
  (the largest shard, i.e. the one on device 0 for even splits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(config, batch_sharding) -> dict:
  """ShapeDtypeStructs of one global batch (inputs/targets i32, mask f32 [B, L])."""
  shape = (config.data.global_batch_size, config.data.seq_len)
  sds = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  return {"inputs": sds(jnp.int32), "targets": sds(jnp.int32), "mask": sds(jnp.float32)}


def plan_memory(config) -> dict:
  """Compiles `config`'s train step on the current devices; returns the per-device plan.

  Keys: devices, mesh, backend, params_bytes, optimizer_bytes, gradient_bytes,
  temp_bytes, total_bytes, compile_s, fits {target: bool}, note.
  """
  exp = build_experiment(config)  # config parsed once, here; only exp.config is read below
  tcfg = exp.config.train
  step = make_train_step(
    exp.model, exp.tx, exp.schedule, tcfg.nan_policy, microbatches=tcfg.microbatches
  )
  jitted = jax.jit(
    step,
    in_shardings=(exp.state_shardings, exp.batch_sharding),
    out_shardings=(exp.state_shardings, None),
    donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = jitted.lower(
    exp.abstract_state, abstract_batch(exp.config, exp.batch_sharding)
  ).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  params_bytes = sharded_bytes(exp.abstract_state.params)
  temp = int(stats.temp_size_in_bytes)
  total = int(
    stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + temp
  )
  backend = jax.default_backend()
  return {
    "devices": exp.mesh.size,
    "mesh": {k: int(v) for k, v in exp.mesh.shape.items()},
    "backend": backend,
    "params_bytes": params_bytes,
    "optimizer_bytes": sharded_bytes(exp.abstract_state.opt_state),
    "gradient_bytes": params_bytes,
    "temp_bytes": temp,
    "total_bytes": total,
    "compile_s": round(compile_s, 2),
    "fits": {name: total <= gib * GIB for name, gib in TARGETS_GIB.items()},
    "note": (
      "per device; gradient_bytes is part of temp_bytes"
      + (
        "; XLA:CPU keeps bfloat16 as float32, so temp/total are upper bounds"
        if backend == "cpu"
        else ""
      )
    ),
  }


def format_plan(plan: dict) -> str:
  """A human-readable table of `plan` (``plan_memory``'s result)."""
  gib = lambda b: f"{b / GIB:9.2f} GiB"
  mesh = ", ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  lines = [
    f"{plan['devices']} {plan['backend']} devices, mesh {mesh}; "
    f"compiled in {plan['compile_s']:.1f} s",
    "",
  ]
  for key in ("params_bytes", "optimizer_bytes", "gradient_bytes", "temp_bytes", "total_bytes"):
    lines.append(f"  {key:<16}{gib(plan[key])}")
  lines.append("")
  for name, ok in plan["fits"].items():
    lines.append(f"  {name:<8} {TARGETS_GIB[name]:>4g} GiB  {'fits' if ok else 'does not fit'}")
  lines += ["", f"({plan['note']})"]
  return "\n".join(lines)
