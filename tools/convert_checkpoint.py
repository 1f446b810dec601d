#!/usr/bin/env python3
"""Convert moejax checkpoints: reshard, export/import Hugging Face, upcycle, merge experts.

Every subcommand reads a run workdir written by ``moejax.train`` (its config.json and
Orbax checkpoints) and writes a new workdir or directory; outputs are never partially
written (a failure leaves no output behind).

  reshard    restore onto another mesh (e.g. expert-parallel degree 8 -> 2) and save
  export-hf  write config.json + safetensors loadable by transformers.from_pretrained
  import-hf  turn an HF checkpoint directory into a moejax run (step-0 checkpoint)
  upcycle    dense run -> MoE run: the FFN copied into every expert, fresh router
  merge      fewer experts by router-frequency-weighted averaging of expert groups

Examples:
  python tools/convert_checkpoint.py reshard --workdir runs/a --out runs/a_ep2 \\
      --mesh data=4,expert=2,model=1
  python tools/convert_checkpoint.py export-hf --workdir runs/a --out hf/a
  python tools/convert_checkpoint.py import-hf --hf_dir hf/a --out runs/b
  python tools/convert_checkpoint.py upcycle --workdir runs/dense --out runs/moe \\
      --num_experts 8 --top_k 2
  python tools/convert_checkpoint.py merge --workdir runs/moe --out runs/moe4 \\
      --num_experts 4 --top_k 1 --frequency_batches 4
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from moejax.cli import parse_mesh, run_subcommand  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402


def _load_config(args) -> ConfigDict:
  from moejax.convert.run_io import load_config_file, load_run_config
  if getattr(args, "config", None):
    return load_config_file(args.config)
  return load_run_config(args.workdir)


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '1024' -> bytes."""
  units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
  for suffix, factor in units.items():
    if text.upper().endswith(suffix):
      return int(float(text[:-2]) * factor)
  return int(text)


def cmd_reshard(args) -> None:
  from moejax.convert.reshard import reshard_checkpoint
  step = reshard_checkpoint(_load_config(args), args.workdir, args.out, args.mesh, args.step)
  print(f"resharded step {step} onto mesh {args.mesh}: {args.out}")


def cmd_export_hf(args) -> None:
  from moejax.convert.hf import export_hf
  from moejax.convert.run_io import restore_state
  config = _load_config(args)
  state, _, step, exp = restore_state(config, args.workdir, args.step)
  files = export_hf(state.params, exp.model_cfg, args.out, family=args.family,
                    max_shard_bytes=args.max_shard_size, dtype=args.dtype,
                    overwrite=args.overwrite)
  print(f"exported step {step} to {args.out}: {', '.join(files)}")


def cmd_import_hf(args) -> None:
  from moejax.config import base_config
  from moejax.convert.hf import import_hf
  from moejax.convert.run_io import load_config_file, write_run
  section, params = import_hf(args.hf_dir)
  config = load_config_file(args.config) if args.config else base_config()
  with config.unlocked():
    config.model = section
  step = write_run(config, args.out, params)
  print(f"imported {args.hf_dir} as step {step} of run {args.out}")


def _moe_section(config, args) -> ConfigDict:
  moe = copy.deepcopy(config.model.get("moe")) or ConfigDict()
  with moe.unlocked():
    for field in ("num_experts", "top_k", "router", "router_order", "capacity_factor"):
      value = getattr(args, field, None)
      if value is not None:
        moe[field] = value
    if getattr(args, "dropless", None) is not None:
      moe.dropless = args.dropless
  return moe


def cmd_upcycle(args) -> None:
  import dataclasses
  import jax.numpy as jnp
  import flax.linen as nn
  from moejax.config import ModelConfig
  from moejax.convert.run_io import restore_state, write_run
  from moejax.convert.upcycle import upcycle_params
  from moejax.models import Transformer

  dense_config = _load_config(args)
  state, _, step, exp = restore_state(dense_config, args.workdir, args.step)
  if exp.model_cfg.moe_every:
    raise ConfigError(f"{args.workdir} is already an MoE model (model.moe_every="
                      f"{exp.model_cfg.moe_every}); upcycle takes a dense run")
  config = copy.deepcopy(dense_config)
  with config.unlocked():
    config.model.moe = _moe_section(dense_config, args)
    config.model.moe.expert_d_ff = dense_config.model.d_ff
    config.model.moe_every = args.moe_every
    config.model.first_moe_layer = args.first_moe_layer
  # the unrolled layers_{i} form (write_run stacks it for a scanned config)
  model_cfg = dataclasses.replace(ModelConfig.from_config(config.model), scan_layers=False)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
      ["params"])
  params = upcycle_params(jax.device_get(state.params), model_cfg, abstract,
                          jax.random.key(args.seed))
  write_run(config, args.out, params)
  print(f"upcycled step {step} of {args.workdir} into {model_cfg.moe.num_experts} experts: "
        f"{args.out}")


def expert_frequency(exp, params, config, num_batches: int) -> dict[int, np.ndarray]:
  """Mean fraction of routed tokens per expert in each MoE layer over training batches."""
  from moejax.data import make_train_iterator
  it = make_train_iterator(config.data, jax.process_index(), jax.process_count())
  apply = jax.jit(lambda p, tokens: exp.model.apply({"params": p}, tokens)[1]["metrics"])
  totals: dict[int, np.ndarray] = {}
  for _ in range(num_batches):
    metrics = jax.device_get(apply(params, next(it)["inputs"]))
    for name, m in metrics.items():
      i = int(name.split("_")[1])
      totals[i] = totals.get(i, 0) + np.asarray(m["expert_load"], np.float64)
  return {i: t / num_batches for i, t in totals.items()}


def cmd_merge(args) -> None:
  from moejax.convert.run_io import restore_state, write_run
  from moejax.convert.upcycle import contiguous_groups, merge_experts

  config = _load_config(args)
  state, _, step, exp = restore_state(config, args.workdir, args.step)
  params = jax.device_get(state.params)
  moe = exp.model_cfg.moe
  if moe is None:
    raise ConfigError(f"{args.workdir} is a dense model; nothing to merge")
  layers = [i for i in range(exp.model_cfg.num_layers) if exp.model_cfg.is_moe_layer(i)]
  frequency = (expert_frequency(exp, state.params, config, args.frequency_batches)
               if args.frequency_batches else None)
  groups = contiguous_groups(moe.num_experts, args.num_experts)
  merged = merge_experts(params, exp.model_cfg, {i: groups for i in layers}, frequency)
  new_config = copy.deepcopy(config)
  with new_config.unlocked():
    new_config.model.moe.num_experts = args.num_experts
    if args.top_k is not None:
      new_config.model.moe.top_k = args.top_k
  write_run(new_config, args.out, merged)
  print(f"merged {moe.num_experts} -> {args.num_experts} experts (groups {groups}) from step "
        f"{step}: {args.out}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, needs_workdir=True):
    if needs_workdir:
      p.add_argument("--workdir", required=True, help="source run directory")
      p.add_argument("--step", type=int, default=None, help="step (default: newest)")
    p.add_argument("--config", default=None,
                   help="config file (default: the workdir's config.json)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")

  p = sub.add_parser("reshard", help="restore onto another mesh and save")
  common(p)
  p.add_argument("--mesh", type=parse_mesh, required=True,
                 help="new mesh, e.g. data=4,expert=2,model=1")
  p.set_defaults(fn=cmd_reshard)

  p = sub.add_parser("export-hf", help="write a transformers-loadable directory")
  common(p)
  p.add_argument("--family", default=None, help="HF family: mixtral or deepseek_v2 (default: inferred from the config)")
  p.add_argument("--max_shard_size", type=parse_size, default=5 * 2**30,
                 help="split safetensors above this size (e.g. 2GB); default 5GB")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="cast tensors (default: keep the param dtype)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.set_defaults(fn=cmd_export_hf)

  p = sub.add_parser("import-hf", help="HF checkpoint directory -> moejax run")
  common(p, needs_workdir=False)
  p.add_argument("--hf_dir", required=True, help="directory with config.json + safetensors")
  p.set_defaults(fn=cmd_import_hf)

  p = sub.add_parser("upcycle", help="dense run -> MoE run (sparse upcycling)")
  common(p)
  p.add_argument("--num_experts", type=int, required=True)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--router", default="topk")
  p.add_argument("--router_order", default="topk_softmax",
                 help="topk_softmax (renormalised) makes step 0 equal the dense model")
  p.add_argument("--dropless", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--capacity_factor", type=float, default=None)
  p.add_argument("--moe_every", type=int, default=1)
  p.add_argument("--first_moe_layer", type=int, default=0)
  p.add_argument("--seed", type=int, default=0, help="seed of the fresh router")
  p.set_defaults(fn=cmd_upcycle)

  p = sub.add_parser("merge", help="merge experts into fewer (frequency-weighted average)")
  common(p)
  p.add_argument("--num_experts", type=int, required=True, help="experts after merging")
  p.add_argument("--top_k", type=int, default=None, help="new top_k (default: unchanged)")
  p.add_argument("--frequency_batches", type=int, default=0,
                 help="weight experts by their load over this many training batches "
                      "(0: uniform average)")
  p.set_defaults(fn=cmd_merge)
  return parser


def main(argv=None) -> int:
  return run_subcommand(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
