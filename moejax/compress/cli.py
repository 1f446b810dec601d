"""moejax-experts: expert analysis and compression of MoE runs (stats, prune, merge,
compress); ``HELP`` is the --help text."""

from __future__ import annotations

import argparse
import json
import os

from moejax.analysis.workflows import stats_run
from moejax.cli import parse_mesh, run_subcommand
from moejax.compress.compressed import compress_run
from moejax.compress.merge import METHODS
from moejax.compress.workflows import merge_run, prune_run
from moejax.evaluate import print_before_after

DESCRIPTION = (
  "moejax-experts: expert analysis and compression of MoE runs: stats, prune, merge, compress."
)
HELP = """\
Every subcommand reads a run workdir written by ``moejax-train`` (its config.json and
Orbax checkpoints) and runs the model over the first --batches batches of a data split.

  stats  per MoE layer: tokens per expert, router entropy, dropped-token rate, expert
         co-activation and super experts (Su et al., 2025); writes report.json and PNGs
  prune  keep the R best experts per layer by EASY-EP (gate x output norm) or PreMoe
         (expected router selection) scores; writes a new run (step-0 checkpoint)
  merge  fewer experts per layer, each group merged weighted by selection frequency;
         --method mc_smoe (Li et al., 2024: groups by router-logit similarity around the
         most frequently selected experts) or contiguous (index ranges); new run
  compress  the J least important experts per layer become vectors, their expected
         outputs (Compressed Experts, He et al., 2025); new run, eval loss before/after

Examples:
  moejax-experts stats --workdir runs/tiny --out reports/tiny --batches 8
  moejax-experts prune --workdir runs/tiny --out runs/tiny_r4 --keep 4 \\
      --method easy_ep
  moejax-experts merge --workdir runs/tiny --out runs/tiny_m4 --num_experts 4 \\
      --method mc_smoe
  moejax-experts compress --workdir runs/tiny --out runs/tiny_c2 --num_compressed 2
  moejax-train --workdir runs/tiny_r4 ...   # fine-tune the result
"""


def cmd_stats(args) -> None:
  report = stats_run(
    args.workdir,
    args.out,
    args.split,
    args.batches,
    args.step,
    args.super_threshold,
    progress=not args.quiet,
  )
  for i, layer in report["layers"].items():
    load = ", ".join(f"{x:.3f}" for x in layer["load_fraction"])
    print(
      f"layer {i}: load [{load}] entropy {layer['router_entropy']:.3f} "
      f"dropped {layer['dropped_rate']:.3%} super experts {layer['super_experts']}"
    )
  print(f"wrote {os.path.join(args.out, 'report.json')} and {len(report['files'])} plots")


def cmd_prune(args) -> None:
  summary = prune_run(
    args.workdir,
    args.out,
    args.keep,
    args.method,
    args.split,
    args.batches,
    args.step,
    args.mesh,
    progress=not args.quiet,
  )
  print(
    f"pruned to {args.keep} experts by {args.method}: kept "
    f"{json.dumps(summary['kept_experts'])}; new run {args.out}"
  )
  print_before_after(args.workdir, summary["step"], args.out, args.eval_batches)


def cmd_merge(args) -> None:
  summary = merge_run(
    args.workdir,
    args.out,
    args.num_experts,
    args.top_k,
    args.split,
    args.batches,
    args.step,
    args.mesh,
    progress=not args.quiet,
    method=args.method,
  )
  print(
    f"merged into {args.num_experts} experts by {args.method} "
    f"(top_k={summary['top_k']}), groups "
    f"{json.dumps(summary['groups'])}; new run {args.out}"
  )
  print_before_after(args.workdir, summary["step"], args.out, args.eval_batches)


def cmd_compress(args) -> None:
  summary = compress_run(
    args.workdir,
    args.out,
    args.num_compressed,
    args.method,
    args.split,
    args.batches,
    args.eval_split,
    args.eval_batches,
    args.step,
    args.mesh,
    progress=not args.quiet,
  )
  print(
    f"compressed {args.num_compressed} experts per layer by {args.method}: kept "
    f"{json.dumps(summary['kept_experts'])}; eval loss {summary['eval_loss_before']:.4f} -> "
    f"{summary['eval_loss_after']:.4f}; new run {args.out}"
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=DESCRIPTION,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=HELP,
  )
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, split: str, batches: int, new_run: bool):
    p.add_argument("--workdir", required=True, help="run directory (config.json + checkpoints)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument(
      "--out",
      required=True,
      help="new run directory (must hold no checkpoints)"
      if new_run
      else "report directory (report.json + PNG plots)",
    )
    p.add_argument("--split", default=split, help=f"data split to run on (default {split})")
    p.add_argument(
      "--batches",
      type=int,
      default=batches,
      help=f"number of batches of the split (default {batches})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if new_run:
      p.add_argument(
        "--eval_batches",
        type=int,
        default=4,
        help="evaluate the source and the new run on this many eval batches and print "
        "loss / bits per byte before -> after (moejax.evaluate; default 4; 0: skip)",
      )
      p.add_argument(
        "--mesh",
        type=parse_mesh,
        default=None,
        help="mesh of the new run, e.g. data=-1,expert=1,model=1 (default: the "
        "source run's; the expert axis must divide the new expert count)",
      )

  p = sub.add_parser(
    "stats",
    help="routing statistics and super experts -> report.json, PNGs",
    description="Per MoE layer: tokens per expert (counts, fractions), mean "
    "router entropy, dropped-token rate, expert co-activation "
    "[E, E] and super experts (max |down_proj output| > "
    "threshold x the layer's median expert maximum).",
  )
  common(p, "validation", 8, new_run=False)
  p.add_argument(
    "--super_threshold",
    type=float,
    default=10.0,
    help="flag experts whose max |activation| exceeds this many times the "
    "layer's median of per-expert maxima (default 10)",
  )
  p.set_defaults(fn=cmd_stats)

  p = sub.add_parser(
    "prune",
    help="keep the R highest-scoring experts per layer -> new run",
    description="Scores experts on in-domain batches and keeps the top R per "
    "MoE layer in their original order (easy_ep: sum over routed "
    "tokens of gate x ||expert output||; premoe: mean router "
    "probability). top_k becomes min(top_k, R).",
  )
  common(p, "train", 4, new_run=True)
  p.add_argument("--keep", type=int, required=True, help="experts R to keep per layer")
  p.add_argument(
    "--method",
    choices=("easy_ep", "premoe"),
    default="easy_ep",
    help="expert score (default easy_ep)",
  )
  p.set_defaults(fn=cmd_prune)

  p = sub.add_parser(
    "merge",
    help="merge into E' experts per layer -> new run",
    description="mc_smoe groups experts around the E' most frequently "
    "selected ones by cosine similarity of their router logits; "
    "contiguous groups index ranges (E' must divide E). Each "
    "group is merged weighted by selection frequency over "
    "--batches batches (0: uniform, contiguous only).",
  )
  common(p, "train", 4, new_run=True)
  p.add_argument("--method", choices=METHODS, required=True, help="how experts are grouped")
  p.add_argument("--num_experts", type=int, required=True, help="experts E' after merging")
  p.add_argument(
    "--top_k", type=int, default=None, help="top_k of the merged model (default min(top_k, E'))"
  )
  p.set_defaults(fn=cmd_merge)

  p = sub.add_parser(
    "compress",
    help="replace the J least important experts per layer by vectors -> new run",
    description="Scores experts (easy_ep or premoe, as prune) and replaces the J "
    "lowest per MoE layer by their mean output over the tokens that chose them "
    "(Compressed Experts); the router keeps all columns. Prints the eval loss "
    "before and after.",
  )
  common(p, "train", 4, new_run=True)
  p.add_argument("--num_compressed", type=int, required=True, help="experts J to compress")
  p.add_argument("--method", choices=("easy_ep", "premoe"), default="easy_ep", help="expert score")
  p.add_argument("--eval_split", default="validation", help="split of the eval loss")
  p.set_defaults(fn=cmd_compress)
  return parser


def main(argv=None) -> int:
  return run_subcommand(build_parser(), argv)


def run() -> None:
  raise SystemExit(main())
