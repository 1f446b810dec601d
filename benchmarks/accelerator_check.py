"""Correctness of the accelerator-only code paths on the current backend (run it on a GPU/TPU).

  python benchmarks/accelerator_check.py [--json] [--only ragged_dot,ragged_a2a,cudnn]

XLA:CPU has no native ``ragged_dot``, rejects ``ragged_all_to_all`` and has no cuDNN, so the
CPU test suite cannot reach these lowerings. This script compares them, on whatever backend
jax picks, against the paths the suite does test (float32 matmuls at 'highest' precision):

  ragged_dot      dropless layer, expert_impl='ragged_dot' (native grouped matmul) vs the
                  C = S slot path: output, aux losses and gradients, for every token-choice
                  router (variable k included); the exact kernel alone
                  (dropless_windows=()), the fast path's main windows alone
                  (dropless_windows=(E,): every load fits) and main windows of the
                  mean load with the overflow loop (dropless_windows=(1, 1.0625), the
                  default).
  ragged_a2a      the expert-parallel row exchange with ep_exchange='ragged_all_to_all' on
                  a mesh of all local devices (data=1, expert=N) vs the unsharded layer:
                  the exact kernel alone, the fast-path windows alone and with the loop.
  cudnn           attention_impl='cudnn' vs the float32 reference, bf16 inputs, GQA,
                  output and gradients (tolerance of bf16 rounding).

Prints one line per check with the max relative error and PASS/FAIL; exit status 1 if any
check fails. No timings (see benchmarks/moe_layer.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.moe import MoELayer
from moejax.models.attention_impl import attend
from moejax.moe_config import MoEConfig
from moejax.parallel import make_mesh, shard_params

ROUTERS = {
  "topk": dict(router="topk", top_k=2),
  "topk_renorm": dict(router="topk", top_k=3, router_order="topk_softmax"),
  "null_experts": dict(router="null_experts", num_null_experts=4, top_k=2),
  "shared_experts": dict(router="shared_experts", num_shared_experts=2, top_k=2),
  "top_p": dict(router="top_p", top_k=3, top_p=0.6, dynamic_loss_weight=0.01),
}
D, F, E, X_SHAPE = 64, 128, 8, (4, 256, 64)


def moe_cfg(name: str, **kw) -> MoEConfig:
  base = dict(num_experts=E, expert_d_ff=F, dropless=True, group_size=256)
  return MoEConfig(**{**ROUTERS[name], **base, **kw}, config_path="model.moe")


def params_for(cfg: MoEConfig, boxed: bool = False):
  tree = MoELayer(cfg).init(jax.random.key(0), jnp.zeros(X_SHAPE, jnp.float32))["params"]
  rng = np.random.default_rng(3)

  def fill(path, leaf):
    scale = 4.0 if "router" in jax.tree_util.keystr(path) else 1.0
    return jnp.asarray(rng.standard_normal(leaf.shape) * scale / np.sqrt(leaf.shape[-2]))

  values = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(tree))
  return nn.meta.replace_boxed(tree, values) if boxed else values


def loss_and_grads(layer: MoELayer, params, x, ct):
  def loss(p, x):
    y, aux = layer.apply({"params": p}, x)
    return jnp.sum(y * ct) + sum(aux["aux_losses"].values()), y

  (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), (value, y, grads))


def max_rel_err(got, want) -> float:
  errs = jax.tree.leaves(
    jax.tree.map(
      lambda a, b: float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))), got, want
    )
  )
  return max(errs)


def check_ragged_dot(x, ct):
  for name in ROUTERS:
    want = loss_and_grads(
      MoELayer(moe_cfg(name, expert_impl="capacity")),
      params_for(moe_cfg(name, expert_impl="capacity")),
      x,
      ct,
    )
    for label, fast in (
      ("ragged_dot", ()),
      ("fast_window", (float(E),)),
      ("fast_window_loop", (1.0, 1.0625)),
    ):
      cfg = moe_cfg(name, expert_impl="ragged_dot", dropless_windows=fast)
      got = loss_and_grads(MoELayer(cfg), params_for(cfg), x, ct)
      yield f"{label}[{name}]", max_rel_err(got, want), 1e-4


def check_ragged_a2a(x, ct):
  n = jax.device_count()
  mesh = make_mesh({"data": 1, "expert": n, "model": 1}, devices=jax.devices()[:n])
  for name in ROUTERS:
    base = moe_cfg(name, expert_impl="capacity")
    want = loss_and_grads(MoELayer(base), params_for(base), x, ct)
    for label, fast in (
      ("ragged_a2a", ()),
      ("ragged_a2a_window", (float(E),)),
      ("ragged_a2a_window_loop", (1.0, 1.0625)),
    ):
      cfg = moe_cfg(name, ep_exchange="ragged_all_to_all", dropless_windows=fast)
      params = nn.meta.unbox(shard_params(params_for(cfg, boxed=True), mesh))
      got = loss_and_grads(MoELayer(cfg, mesh=mesh), params, x, ct)
      yield f"{label}[{name}, {n} device(s)]", max_rel_err(got, want), 1e-4


def check_cudnn():
  rng = np.random.default_rng(0)
  b, length, h, hkv, dk = 2, 512, 8, 2, 64
  q, k, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
    for s in ((b, length, h, dk), (b, length, hkv, dk), (b, length, hkv, dk), (b, length, h, dk))
  )

  def run(impl, dtype):
    def loss(q, k, v):
      out = attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), None, impl)
      return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), (out, grads))

  want = run("reference", jnp.float32)
  yield "cudnn[bf16, GQA 8/2, L=512]", max_rel_err(run("cudnn", jnp.bfloat16), want), 2e-2
  yield "xla[bf16, GQA 8/2, L=512]", max_rel_err(run("xla", jnp.bfloat16), want), 2e-2


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", action="store_true", help="one JSON object per check on stdout")
  p.add_argument(
    "--only", default="ragged_dot,ragged_a2a,cudnn", help="comma-separated check groups to run"
  )
  args = p.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  print(f"backend={jax.default_backend()} devices={jax.devices()}", file=sys.stderr)
  rng = np.random.default_rng(1)
  x, ct = (jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32) for _ in range(2))
  failed = 0
  groups = {
    "ragged_dot": lambda: check_ragged_dot(x, ct),
    "ragged_a2a": lambda: check_ragged_a2a(x, ct),
    "cudnn": check_cudnn,
  }
  unknown = set(args.only.split(",")) - set(groups)
  if unknown:
    p.error(f"--only: unknown group(s) {sorted(unknown)} (allowed: {', '.join(groups)})")

  def results(group_name):  # each check as it finishes; an exception ends its group
    try:
      yield from groups[group_name]()
    except Exception as e:  # report and go on with the other groups
      print(f"ERROR {type(e).__name__}: {str(e)[:500]}", file=sys.stderr)
      yield group_name, float("nan"), 0.0

  for group_name in args.only.split(","):
    for name, err, tol in results(group_name):
      ok = bool(err <= tol)
      failed += not ok
      row = dict(check=name, max_rel_err=err, tol=tol, ok=ok, backend=jax.default_backend())
      print(
        json.dumps(row)
        if args.json
        else f"{'PASS' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:g})",
        flush=True,
      )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
