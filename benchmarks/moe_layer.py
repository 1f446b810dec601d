"""Step time of the MoE layer (dropless and capacity 1.25) vs an equal-active-FLOP dense FFN.

  python benchmarks/moe_layer.py                 # 1 and 8 devices (one subprocess each)
  python benchmarks/moe_layer.py --quick         # smaller shapes, fewer steps
  python benchmarks/moe_layer.py --devices 8     # only 8 (simulated on CPU) devices
  python benchmarks/moe_layer.py --json          # one JSON object per row (table on stderr)

Layers (SwiGLU experts, routing groups of --group-size tokens, d_model = D, width f):
  top2_of_8    router='topk', E = 8, k = 2, expert width f        vs DenseFFN(d_ff = 2 f)
  top6_of_64   router='topk', E = 64, k = 6, expert width f / 4   vs DenseFFN(d_ff = 6 f / 4)
               (fine-grained, DeepSeekMoE-style; Dai et al., 2024)
so every variant does the same useful FFN FLOPs per token. MoE variants (impl column):
  dropless      dropless=True, the sorted grouped matmul (expert_impl='auto': 'blocked' on
                CPU and GPU, 'ragged_dot' on TPU) behind its fast path (every expert's
                first L = the mean rows as dense matmuls, rows past L in a loop
                of one block per step); on 8 devices the row exchange
  dropless_exact  the grouped kernel alone, without the fast path (dropless_windows=())
  dropless_cs   dropless=True, expert_impl='capacity': the old C = S slot buffers
  capacity      capacity_factor=1.25 slot buffers (GShard/Switch, drops overflow)

Passes: 'fwd' = y = layer(x); 'fwd+bwd' = grads of sum(y * ct) (+ aux losses) w.r.t.
params and x. Each is one jitted function; after a warm-up call (compilation) the median
of --steps timed calls is reported (``block_until_ready``), all functions of a layer
timed in alternation (blocks of 5 calls after an untimed one, see ``measure``) so that load
changes hit every variant alike.

a2a_bytes_over_min: from the compiled HLO of the 8-device step, the bytes the all-to-alls
of one device carry (results, summed over the ops of the pass: 2 forward, 4 forward +
backward) over the minimum, tokens_per_device x k x d_model x 4 bytes each way.

On N > 1 devices the MoE layer is expert-parallel (mesh data=1, expert=N, model=1) and the
dense FFN data-parallel. Several devices on a CPU are simulated by XLA
(``--xla_force_host_platform_device_count``), set before jax is imported, so each device
count runs in its own subprocess; simulated devices share the same cores: the numbers
show overheads, not parallel speed-ups.

When torch and transformers are installed, the 1-device run also times transformers'
``MixtralSparseMoeBlock`` (``experts_implementation`` 'eager' and 'grouped_mm') on the
top2_of_8 shapes, in the same alternation, and prints moejax dropless / torch. Timings are
printed, never asserted.

Each child process first sets ``moejax.host_allocator`` (--host-allocator, default auto:
on the CPU, freed host memory is kept for reuse, as ``moejax.train`` does); torch runs in
the same process, so both frameworks allocate alike.
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
  p.add_argument(
    "--devices",
    type=int,
    choices=(1, 8),
    action="append",
    help="device counts to run (repeatable; default: 1 and 8)",
  )
  p.add_argument("--quick", action="store_true", help="small shapes and few steps")
  p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  p.add_argument("--tokens", type=int, default=None, help="tokens per step (batch * length)")
  p.add_argument("--d-model", type=int, default=None)
  p.add_argument("--expert-d-ff", type=int, default=None, help="f (top-2 expert width)")
  p.add_argument("--group-size", type=int, default=None, help="routing group size S")
  p.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
  p.add_argument(
    "--dropless-impls",
    default="auto",
    help="comma list of dropless expert_impl values to time (auto, blocked, ragged_dot)",
  )
  p.add_argument("--skip-cs", action="store_true", help="skip the C = S row (large shapes)")
  p.add_argument(
    "--skip-exact",
    action="store_true",
    help="skip the dropless_exact rows (the grouped kernel without the fast path)",
  )
  p.add_argument(
    "--host-allocator",
    choices=("auto", "keep", "system"),
    default="auto",
    help="moejax.host_allocator mode of each child process (both frameworks share it); "
    "auto: keep freed host memory on the CPU",
  )
  p.add_argument("--json", action="store_true", help="print one JSON object per row")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  quick = dict(steps=5, tokens=2048, d_model=128, expert_d_ff=256, group_size=256)
  full = dict(steps=10, tokens=4096, d_model=256, expert_d_ff=512, group_size=512)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.devices = sorted(set(args.devices or (1, 8)))
  return args


# ------------------------------------------------------------------------------------------
# Child process: one device count.
# ------------------------------------------------------------------------------------------


def measure(fns: dict, steps: int, block: int = 5) -> dict:
  """Median wall time in ms of each zero-argument fn, after one warm-up (compiling) call.

  The fns are timed in alternation, so that a change in machine load during the run
  affects all of them alike, in blocks: each turn of a fn is one untimed call, then `block`
  timed calls. A framework's worker threads keep spinning for a while after a call; timed
  right after another framework's call, torch measured 15-25% slower on this 2-core CPU
  (XLA did not), so the untimed call lets them settle.
  """
  import jax

  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(-(-steps // block)):
    for k, fn in fns.items():
      jax.block_until_ready(fn())
      for _ in range(block):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times[k].append(time.perf_counter() - t)
  return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def all_to_all_bytes(hlo_text: str) -> int:
  """Bytes of all all-to-all results of one device in compiled HLO text (XLA:CPU splits an
  all-to-all into a tuple of per-peer pieces; they are summed)."""
  import re

  width = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8}
  total = 0
  for line in hlo_text.splitlines():
    if " all-to-all(" in line:
      result = line.split(" all-to-all(")[0].split("= ", 1)[1]
      for dtype, dims in re.findall(r"([a-z]+\d+)\[([\d,]*)\]", result):
        n = 1
        for v in (int(x) for x in dims.split(",") if x):
          n *= v
        total += n * width[dtype]
  return total


def torch_fns(args, x_np, ct_np) -> dict:
  """transformers' MixtralSparseMoeBlock (eager, grouped_mm) on the top2_of_8 shapes."""
  try:
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  except ImportError:
    return {}
  import jax

  # On a GPU run, torch runs on the GPU too, synchronised so the wall time covers its kernels.
  cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  fns = {}
  x = torch.tensor(x_np.reshape(-1, x_np.shape[-1])[None], device=device)
  ct = torch.tensor(ct_np.reshape(-1, ct_np.shape[-1])[None], device=device)
  for impl in ("eager", "grouped_mm"):
    cfg = MixtralConfig(
      hidden_size=args.d_model,
      intermediate_size=args.expert_d_ff,
      num_local_experts=8,
      num_experts_per_tok=2,
      experts_implementation=impl,
    )
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).float().train().to(device)

    def fwd(block=block):
      with torch.no_grad():
        out = block(x)
      sync()
      return out

    def fwd_bwd(block=block):
      block.zero_grad(set_to_none=True)
      xg = x.clone().requires_grad_(True)
      out = block(xg)
      out = out[0] if isinstance(out, tuple) else out
      (out * ct).sum().backward()
      sync()
      return xg.grad

    fns[(f"torch_{impl}", "fwd")] = fwd
    fns[(f"torch_{impl}", "fwd+bwd")] = fwd_bwd
  return fns


def run_device_count(num_devices: int, args) -> list[dict]:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, REPO)
  from moejax.layers import DenseFFN, MoELayer
  from moejax.moe_config import MoEConfig
  from moejax.parallel import TOKEN_AXES, make_mesh, shard_params

  devices = jax.devices()[:num_devices]
  if len(devices) != num_devices:
    raise SystemExit(f"asked for {num_devices} devices, jax sees {len(jax.devices())}")
  mesh = (
    make_mesh({"data": 1, "expert": -1, "model": 1}, devices=devices) if num_devices > 1 else None
  )
  d, f, group = args.d_model, args.expert_d_ff, args.group_size
  seq = group
  batch = args.tokens // seq
  shapes = {"top2_of_8": (8, 2, f), "top6_of_64": (64, 6, f // 4)}
  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((batch, seq, d)).astype(np.float32)
  ct_np = rng.standard_normal((batch, seq, d)).astype(np.float32)
  x, ct = jnp.asarray(x_np), jnp.asarray(ct_np)
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
  for name, (e, k, width) in shapes.items():
    common = dict(
      router="topk", num_experts=e, top_k=k, expert_d_ff=width, group_size=group, activation="silu"
    )
    dropless_impls = {
      "dropless:" + MoEConfig(dropless=True, expert_impl=i, **common).resolved_expert_impl(): i
      for i in args.dropless_impls.split(",")
    }
    layers = {
      name: MoELayer(MoEConfig(dropless=True, expert_impl=i, **common), mesh=mesh)
      for name, i in dropless_impls.items()
    }
    if not args.skip_exact:  # the exact grouped kernel alone: what a load past L costs
      layers.update(
        {
          name.replace("dropless:", "dropless_exact:"): MoELayer(
            MoEConfig(dropless=True, expert_impl=i, dropless_windows=(), **common),
            mesh=mesh,
          )
          for name, i in dropless_impls.items()
        }
      )
    if not args.skip_cs:
      layers["dropless_cs"] = MoELayer(
        MoEConfig(dropless=True, expert_impl="capacity", **common), mesh=mesh
      )
    layers["capacity"] = MoELayer(MoEConfig(capacity_factor=1.25, **common), mesh=mesh)
    layers["dense"] = DenseFFN(k * width)
    fns, a2a = {}, {}
    for impl, layer in layers.items():
      boxed = layer.init(jax.random.key(0), x)["params"]
      params = nn.meta.unbox(shard_params(boxed, mesh) if mesh is not None else boxed)
      fwd, fwd_bwd = jitted(layer)
      fns[(impl, "fwd")] = functools.partial(fwd, params, x)
      fns[(impl, "fwd+bwd")] = functools.partial(fwd_bwd, params, x, ct)
      if mesh is not None and impl != "dense":
        minimum = args.tokens // num_devices * k * d * 4  # bytes, one direction
        for pass_, fn, argv, ways in (
          ("fwd", fwd, (params, x), 2),
          ("fwd+bwd", fwd_bwd, (params, x, ct), 4),
        ):
          text = fn.lower(*argv).compile().as_text()
          a2a[(impl, pass_)] = all_to_all_bytes(text) / (ways * minimum)
    if name == "top2_of_8" and num_devices == 1 and not args.no_torch:
      fns.update(torch_fns(args, x_np, ct_np))
    times = measure(fns, args.steps)
    for pass_ in ("fwd", "fwd+bwd"):
      for impl in [i for i, p in times if p == pass_]:
        ms = times[(impl, pass_)]
        rows.append(
          dict(
            layer=name,
            devices=num_devices,
            pass_=pass_,
            impl=impl,
            ms=ms,
            ratio_to_dense=ms / times[("dense", pass_)],
            ratio_to_capacity=ms / times[("capacity", pass_)],
            a2a_bytes_over_min=a2a.get((impl, pass_)),
          )
        )
  return rows


# ------------------------------------------------------------------------------------------
# Parent: one subprocess per device count, then the table.
# ------------------------------------------------------------------------------------------


def child_argv(args, num_devices: int) -> list[str]:
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    "--child",
    "--devices",
    str(num_devices),
    "--steps",
    str(args.steps),
    "--tokens",
    str(args.tokens),
    "--d-model",
    str(args.d_model),
    "--expert-d-ff",
    str(args.expert_d_ff),
    "--group-size",
    str(args.group_size),
    "--dropless-impls",
    args.dropless_impls,
    "--host-allocator",
    args.host_allocator,
  ]
  argv += ["--skip-cs"] if args.skip_cs else []
  argv += ["--skip-exact"] if args.skip_exact else []
  return argv + (["--quick"] if args.quick else []) + (["--no-torch"] if args.no_torch else [])


def format_table(rows: list[dict], args) -> str:
  lines = [
    f"tokens/step={args.tokens}  d_model={args.d_model}  top-2 expert_d_ff="
    f"{args.expert_d_ff}  group_size={args.group_size}  f32  median of {args.steps} "
    f"steps  host allocator: {args.host_allocator}",
    "",
    "| layer      | devices | pass    | impl                     |     ms | /dense | /capacity "
    "| a2a bytes/min |",
    "|------------|---------|---------|--------------------------|--------|--------|-----------"
    "|---------------|",
  ]
  for r in rows:
    a2a = "" if r["a2a_bytes_over_min"] is None else f"{r['a2a_bytes_over_min']:.2f}"
    lines.append(
      f"| {r['layer']:<10} | {r['devices']:>7} | {r['pass_']:<7} | "
      f"{r['impl']:<24} | {r['ms']:>6.1f} | {r['ratio_to_dense']:>6.2f} | "
      f"{r['ratio_to_capacity']:>9.2f} | {a2a:>13} |"
    )
  torch_rows = {(r["pass_"], r["impl"]): r["ms"] for r in rows if r["impl"].startswith("torch")}
  ours = {
    r["pass_"]: r["ms"]
    for r in rows
    if r["layer"] == "top2_of_8" and r["devices"] == 1 and r["impl"].startswith("dropless:")
  }
  if torch_rows:
    lines += ["", "moejax dropless / transformers MixtralSparseMoeBlock (top2_of_8, 1 device):"]
    for (pass_, impl), ms in sorted(torch_rows.items()):
      lines.append(f"  {pass_:<7} vs {impl:<16} {ours[pass_] / ms:.2f}")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:  # exactly one device count, XLA flags already in the environment
    sys.path.insert(0, REPO)
    from moejax import host_allocator

    host_allocator.configure(args.host_allocator)  # before any framework starts threads
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
    rows.extend(json.loads(line[len("RESULT ") :]))
  if args.json:  # JSON lines on stdout, the table on stderr
    sys.stderr.write(format_table(rows, args) + "\n")
    for r in rows:
      print(
        json.dumps(
          {
            "layer": r["layer"],
            "devices": r["devices"],
            "pass": r["pass_"],
            "impl": r["impl"],
            "ms": r["ms"],
            "ratio_to_dense": r["ratio_to_dense"],
            "ratio_to_capacity": r["ratio_to_capacity"],
            "a2a_bytes_over_min": r["a2a_bytes_over_min"],
          }
        )
      )
  else:
    print(format_table(rows, args))


if __name__ == "__main__":
  main()
