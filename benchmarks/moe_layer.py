"""Step time of the MoE layer vs an equal-active-FLOP dense FFN, side by side.

  python benchmarks/moe_layer.py                 # 1 and 8 devices (one subprocess each)
  python benchmarks/moe_layer.py --quick         # smaller shapes, fewer steps (< 2 min)
  python benchmarks/moe_layer.py --devices 8     # only 8 (simulated on CPU) devices

Layers (SwiGLU experts, capacity factor 1.25, d_model = D):
  top2_of_8   router='topk', E = 8, k = 2, expert width f
              vs DenseFFN(d_ff = 2 f)
  deepseek    router='shared_experts', 2 shared + E = 16 fine-grained experts of width
              f / 2, k = 4 (DeepSeekMoE, Dai et al., 2024)
              vs DenseFFN(d_ff = 4 * f/2 + 2 * f/2 = 3 f)
so both sides do the same FFN FLOPs per token (the MoE side adds routing, gather/scatter
and the capacity-factor slack: its expert matmuls run on cf * k * tokens slots).

Passes: 'fwd' = y = layer(x); 'fwd+bwd' = grads of sum(y * ct) (+ aux losses) w.r.t.
params and x. Each is one jitted function; after a warm-up call (compilation) the median
of --steps timed calls is reported (``block_until_ready``), the four functions of a layer
timed in alternation so that load changes hit MoE and dense alike.

On N > 1 devices the MoE layer is expert-parallel (mesh data=1, expert=N, model=1:
groups split over devices, slots exchanged with all_to_all) and the dense FFN is data-
parallel (tokens split, weights replicated). Several devices on a CPU are simulated by
XLA (``--xla_force_host_platform_device_count``), which must be set before jax is
imported; each device count therefore runs in its own subprocess. Simulated devices
share the same cores: the numbers show overheads (collectives, per-device dispatch), not
parallel speed-ups. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, choices=(1, 8), action="append",
                 help="device counts to run (repeatable; default: 1 and 8)")
  p.add_argument("--quick", action="store_true", help="small shapes and few steps")
  p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  p.add_argument("--tokens", type=int, default=None, help="tokens per step (batch * length)")
  p.add_argument("--d-model", type=int, default=None)
  p.add_argument("--expert-d-ff", type=int, default=None, help="f (top-2 expert width)")
  p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child output
  args = p.parse_args(argv)
  quick = dict(steps=5, tokens=2048, d_model=128, expert_d_ff=256)
  full = dict(steps=20, tokens=8192, d_model=256, expert_d_ff=512)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.devices = sorted(set(args.devices or (1, 8)))
  return args


# ------------------------------------------------------------------------------------------
# Child process: one device count.
# ------------------------------------------------------------------------------------------


def measure(fns: dict, steps: int) -> dict:
  """Median wall time in ms of each zero-argument fn, after one warm-up (compiling) call.

  The fns are timed in alternation (one step of each per round), so a change in machine
  load during the run affects all of them alike.
  """
  import jax  # noqa: PLC0415 (imported after XLA_FLAGS is set)
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(steps):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def run_device_count(num_devices: int, args) -> list[dict]:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, REPO)
  from moejax.layers import DenseFFN, MoELayer
  from moejax.moe_config import MoEConfig
  from moejax.parallel import TOKEN_AXES, make_mesh, shard_params

  devices = jax.devices()[:num_devices]
  if len(devices) != num_devices:
    raise SystemExit(f"asked for {num_devices} devices, jax sees {len(jax.devices())}")
  mesh = (make_mesh({"data": 1, "expert": -1, "model": 1}, devices=devices)
          if num_devices > 1 else None)
  d, f, group = args.d_model, args.expert_d_ff, 256
  seq = 256
  batch = args.tokens // seq
  common = dict(capacity_factor=1.25, group_size=group, activation="silu")
  layers = {
      "top2_of_8": (MoEConfig(router="topk", num_experts=8, expert_d_ff=f, top_k=2,
                              **common), 2 * f),
      "deepseek": (MoEConfig(router="shared_experts", num_experts=16, expert_d_ff=f // 2,
                             top_k=4, num_shared_experts=2, **common), 3 * f),
  }
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, seq, d)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((batch, seq, d)), jnp.float32)
  if mesh is not None:
    x, ct = jax.device_put((x, ct), NamedSharding(mesh, P(TOKEN_AXES, None, None)))

  def jitted(layer):
    def fwd(params, x):
      return layer.apply({"params": params}, x)[0]

    def loss(params, x, ct):
      y, aux = layer.apply({"params": params}, x)
      return jnp.sum(y * ct) + sum(aux["aux_losses"].values(), jnp.zeros(()))

    grad = jax.grad(loss, argnums=(0, 1))
    return jax.jit(fwd), jax.jit(lambda p, x, ct: grad(p, x, ct))

  rows = []
  for name, (cfg, dense_d_ff) in layers.items():
    moe = MoELayer(cfg, mesh=mesh)
    dense = DenseFFN(dense_d_ff)
    fns = {}
    for kind, layer in (("moe", moe), ("dense", dense)):
      boxed = layer.init(jax.random.key(0), x)["params"]
      params = nn.meta.unbox(shard_params(boxed, mesh) if mesh is not None else boxed)
      fwd, fwd_bwd = jitted(layer)
      fns[(kind, "fwd")] = functools.partial(fwd, params, x)
      fns[(kind, "fwd+bwd")] = functools.partial(fwd_bwd, params, x, ct)
    times = measure(fns, args.steps)
    for pass_ in ("fwd", "fwd+bwd"):
      rows.append(dict(layer=name, devices=num_devices, pass_=pass_,
                       dense_ms=times[("dense", pass_)], moe_ms=times[("moe", pass_)]))
  return rows


# ------------------------------------------------------------------------------------------
# Parent: one subprocess per device count, then the table.
# ------------------------------------------------------------------------------------------


def child_argv(args, num_devices: int) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), "--json", "--devices", str(num_devices),
          "--steps", str(args.steps), "--tokens", str(args.tokens), "--d-model",
          str(args.d_model), "--expert-d-ff", str(args.expert_d_ff)]
  return argv + (["--quick"] if args.quick else [])


def format_table(rows: list[dict], args) -> str:
  lines = [f"tokens/step={args.tokens}  d_model={args.d_model}  top-2 expert_d_ff="
           f"{args.expert_d_ff}  group_size=256  capacity_factor=1.25  f32  "
           f"median of {args.steps} steps",
           "",
           "| layer     | devices | pass    | dense ms | MoE ms | MoE/dense |",
           "|-----------|---------|---------|----------|--------|-----------|"]
  for r in rows:
    lines.append(f"| {r['layer']:<9} | {r['devices']:>7} | {r['pass_']:<7} | "
                 f"{r['dense_ms']:>8.2f} | {r['moe_ms']:>6.2f} | "
                 f"{r['moe_ms'] / r['dense_ms']:>9.2f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.json:  # child: exactly one device count, XLA flags already in the environment
    rows = run_device_count(args.devices[0], args)
    print("RESULT " + json.dumps(rows))
    return
  rows = []
  for n in args.devices:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    flags = env.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    out = subprocess.run(child_argv(args, n), env=env, capture_output=True, text=True)
    if out.returncode:
      sys.stderr.write(out.stderr)
      raise SystemExit(f"benchmark on {n} device(s) failed (exit {out.returncode})")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    rows.extend(json.loads(line[len("RESULT "):]))
  print(format_table(rows, args))


if __name__ == "__main__":
  main()
