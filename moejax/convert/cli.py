"""moejax-convert: reshard, export/import Hugging Face, upcycle, readme-split (run workdir
-> new workdir or directory); ``HELP`` is the --help text."""

from __future__ import annotations

import argparse
import dataclasses

from moejax.cli import parse_mesh, run_subcommand
from moejax.compress.readme_split import readme_split_run
from moejax.compress.workflows import UPCYCLE_MOE_FIELDS, upcycle_run
from moejax.config import ExperimentConfig, base_config
from moejax.convert.hf import export_hf, import_hf
from moejax.convert.reshard import reshard_checkpoint
from moejax.evaluate import print_before_after
from moejax.training.paths import as_path
from moejax.training.workdir import (
  CONFIG_FILE,
  load_config_file,
  load_run_config,
  restore_state,
  write_run,
)

DESCRIPTION = "moejax-convert: reshard, export/import Hugging Face, upcycle, readme-split."
HELP = """\
Every subcommand reads a run workdir written by ``moejax-train`` (its config.json and
Orbax checkpoints) and writes a new workdir or directory; outputs are never partially
written (a failure leaves no output behind).

  reshard    restore onto another mesh (e.g. expert-parallel degree 8 -> 2) and save
  export-hf  write config.json + safetensors loadable by transformers.from_pretrained
  import-hf  turn an HF checkpoint directory into a moejax run (step-0 checkpoint)
  upcycle    dense run -> MoE run: the FFN copied into every expert, fresh router
  readme-split  dense run -> smaller MoE run: each FFN's hidden units clustered by
             activation pattern into experts, router from the clusters (Read-ME)

(Merging experts is ``moejax-experts merge --method contiguous|mc_smoe``.)

Examples:
  moejax-convert reshard --workdir runs/a --out runs/a_ep2 \\
      --mesh data=4,expert=2,model=1
  moejax-convert export-hf --workdir runs/a --out hf/a
  moejax-convert import-hf --hf_dir hf/a --out runs/b
  moejax-convert upcycle --workdir runs/dense --out runs/moe \\
      --num_experts 8 --top_k 2
  moejax-convert readme-split --workdir runs/dense --out runs/readme \\
      --num_experts 4 --top_k 2
"""


def _config_file(args) -> ExperimentConfig | None:
  """The parsed --config file, or None."""
  path = getattr(args, "config", None)
  return ExperimentConfig.from_config(load_config_file(path)) if path else None


def _load_config(args) -> ExperimentConfig:
  return _config_file(args) or load_run_config(args.workdir)


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '1024' -> bytes."""
  units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
  for suffix, factor in units.items():
    if text.upper().endswith(suffix):
      return int(float(text[:-2]) * factor)
  return int(text)


def cmd_reshard(args) -> None:
  step = reshard_checkpoint(_load_config(args), args.workdir, args.out, args.mesh, args.step)
  print(f"resharded step {step} onto mesh {args.mesh}: {args.out}")


def cmd_export_hf(args) -> None:
  state, _, step, exp = restore_state(_load_config(args), args.workdir, args.step)
  files = export_hf(
    state.params,
    exp.model_cfg,
    args.out,
    family=args.family,
    max_shard_bytes=args.max_shard_size,
    dtype=args.dtype,
    overwrite=args.overwrite,
    allow_inexact=args.allow_inexact,
    tokenizer_dir=args.tokenizer_dir,
  )
  print(f"exported step {step} to {args.out}: {', '.join(files)}")


def cmd_import_hf(args) -> None:
  model_cfg, params = import_hf(args.hf_dir)
  config = _config_file(args) or ExperimentConfig.from_config(base_config())
  config = dataclasses.replace(config, model=model_cfg)
  config.check_cross_section()
  step = write_run(config, args.out, params)
  print(f"imported {args.hf_dir} as step {step} of run {args.out}")


def cmd_upcycle(args) -> None:
  # The --config file (else the dense run's config.json), read once: parsed for the run,
  # and its written ``model.moe`` fields kept (a dense model's parsed config has none)
  # unless a flag sets them.
  raw = load_config_file(args.config or str(as_path(args.workdir) / CONFIG_FILE))
  config = ExperimentConfig.from_config(raw)
  moe = raw.model.get("moe")
  stored = moe.to_dict() if moe is not None else {}
  stored.pop("expert_d_ff", None)
  flags = {f: getattr(args, f) for f in UPCYCLE_MOE_FIELDS}
  summary = upcycle_run(
    args.workdir,
    args.out,
    {**stored, **{f: v for f, v in flags.items() if v is not None}},
    args.moe_every,
    args.first_moe_layer,
    args.seed,
    args.step,
    config,
  )
  print(
    f"upcycled step {summary['step']} of {args.workdir} into {summary['num_experts']} "
    f"experts: {args.out}"
  )
  print_before_after(args.workdir, summary["step"], args.out, args.eval_batches)


def cmd_readme_split(args) -> None:
  summary = readme_split_run(
    args.workdir,
    args.out,
    args.num_experts,
    args.top_k,
    args.split,
    args.batches,
    args.eval_batches,
    args.router_scale,
    args.seed,
    args.step,
  )
  print(
    f"split step {summary['step']} of {args.workdir} into {args.num_experts} experts "
    f"(top-{args.top_k}); eval loss {summary['eval_loss_before']:.4f} -> "
    f"{summary['eval_loss_after']:.4f}: {args.out}"
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=DESCRIPTION,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=HELP,
  )
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, needs_workdir=True):
    if needs_workdir:
      p.add_argument("--workdir", required=True, help="source run directory")
      p.add_argument("--step", type=int, default=None, help="step (default: newest)")
    p.add_argument(
      "--config", default=None, help="config file (default: the workdir's config.json)"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")

  p = sub.add_parser("reshard", help="restore onto another mesh and save")
  common(p)
  p.add_argument(
    "--mesh", type=parse_mesh, required=True, help="new mesh, e.g. data=4,expert=2,model=1"
  )
  p.set_defaults(fn=cmd_reshard)

  p = sub.add_parser("export-hf", help="write a transformers-loadable directory")
  common(p)
  p.add_argument(
    "--family",
    default=None,
    help="HF family: mixtral, deepseek_v2, deepseek_v3, qwen3_moe, qwen2_moe or olmoe "
    "(default: inferred from the config)",
  )
  p.add_argument(
    "--max_shard_size",
    type=parse_size,
    default=5 * 2**30,
    help="split safetensors above this size (e.g. 2GB); default 5GB",
  )
  p.add_argument(
    "--dtype",
    default=None,
    choices=("float32", "bfloat16", "float16"),
    help="cast tensors (default: keep the param dtype)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument(
    "--allow_inexact",
    action="store_true",
    help="export a model transformers cannot reproduce exactly (e.g. capacity dropping); "
    "a warning says what differs",
  )
  p.add_argument("--tokenizer_dir", default=None, help="copy tokenizer files from this directory")
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
  p.add_argument(
    "--router_order",
    default="topk_softmax",
    help="topk_softmax (renormalised) makes step 0 equal the dense model",
  )
  p.add_argument("--dropless", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--capacity_factor", type=float, default=None)
  p.add_argument("--moe_every", type=int, default=1)
  p.add_argument("--first_moe_layer", type=int, default=0)
  p.add_argument("--seed", type=int, default=0, help="seed of the fresh router")
  p.add_argument(
    "--eval_batches",
    type=int,
    default=4,
    help="evaluate the dense and the upcycled run on this many eval batches and print "
    "loss before -> after (moejax.evaluate; default 4; 0: skip)",
  )
  p.set_defaults(fn=cmd_upcycle)

  p = sub.add_parser("readme-split", help="dense run -> MoE run by activation clustering (Read-ME)")
  p.add_argument("--workdir", required=True, help="source (dense) run directory")
  p.add_argument("--step", type=int, default=None, help="step (default: newest)")
  p.add_argument("--out", required=True, help="new run directory (must hold no checkpoints)")
  p.add_argument("--num_experts", type=int, required=True, help="experts E (must divide d_ff)")
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--split", default="train", help="calibration split (default train)")
  p.add_argument("--batches", type=int, default=2, help="calibration batches (default 2)")
  p.add_argument("--eval_batches", type=int, default=4, help="validation batches for the loss")
  p.add_argument(
    "--router_scale", type=float, default=1.0, help="router = scale x cluster gate centroids"
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the k-means start")
  p.set_defaults(fn=cmd_readme_split)

  return parser


def main(argv=None) -> int:
  return run_subcommand(build_parser(), argv)


def run() -> None:
  raise SystemExit(main())
