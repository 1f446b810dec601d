"""Samples text from a run's checkpoint (``moejax.inference``).

  python -m moejax.generate --workdir W [--step N] --prompt "text" [--prompt "more"] \
      [--max_new_tokens 64] [--temperature 0 --top_p 1 --top_k 0 --seed 0] \
      [--decoding scmoe --scmoe_beta 0.5 --scmoe_alpha 0.1 --scmoe_weak rank:2]
  python -m moejax.generate --workdir W --prompt_ids 1,2,3 [--prompt_ids 4,5] ...

--prompt encodes with the run's ``data.tokenizer`` (or --tokenizer; bos first) and prints
each prompt with its continuation; --prompt_ids takes and prints token ids. Temperature 0
is greedy. Generation stops at the tokenizer's eos. Runs on the run's mesh (all devices),
or on one device with --one_device. --decoding scmoe contrasts the model's routing with a
weak routing (top1, or rank:K: only the K-th ranked expert) of the same params, SCMoE
(Shi et al., 2024; ``moejax.inference.contrast``). Exit codes: 0 done, 2 bad arguments
or config.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp
import numpy as np

from moejax.data.tokenizer import load_tokenizer
from moejax.errors import ConfigError
from moejax.inference import (
  ContrastConfig,
  SamplingConfig,
  generate_tokens,
  inference_model_config,
)
from moejax.inference.run import load_run
from moejax.models import Transformer
from moejax.models.transformer import pregate_choices
from moejax.routers.pregate import distinct_experts


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--prompt_ids {text!r}: expected comma-separated ints") from e


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", required=True, help="Run directory (config.json + checkpoints).")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: newest).")
  p.add_argument("--prompt", action="append", default=[], help="Prompt text (repeatable).")
  p.add_argument(
    "--prompt_ids",
    action="append",
    type=_parse_ids,
    default=[],
    help="Prompt token ids, e.g. 1,2,3 (repeatable).",
  )
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
  p.add_argument("--top_k", type=int, default=0, help="0 = off.")
  p.add_argument("--top_p", type=float, default=1.0, help="1 = off.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--decoding",
    choices=("standard", "scmoe"),
    default="standard",
    help="scmoe: self-contrast of strong and weak routing (Shi et al., 2024).",
  )
  p.add_argument("--scmoe_beta", type=float, default=0.5, help="Contrast strength beta >= 0.")
  p.add_argument(
    "--scmoe_alpha", type=float, default=0.1, help="Plausibility threshold alpha in [0, 1]."
  )
  p.add_argument("--scmoe_weak", default="rank:2", help="Weak routing: top1 or rank:K.")
  p.add_argument("--tokenizer", default=None, help="Override the run's data.tokenizer.")
  p.add_argument("--one_device", action="store_true", help="Run on a single device.")
  p.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
  p.add_argument(
    "--report_experts",
    action="store_true",
    help="router='pregate' (Read-ME): print the distinct experts each MoE layer reads per "
    "decode step and per batch, known from the tokens before the layers run.",
  )
  return p


def expert_lookahead_report(model_cfg, params, prompts, new, pad_id: int) -> dict:
  """Read-ME's lookahead (Cai et al., 2024): with the pre-gating router every layer's
  experts for a token follow from the token alone, so the expert weights of decode step t
  are known when its input token is. Returns ``routers.pregate.distinct_experts`` of the
  generated tokens' choices [T, B, M, K] (steps past a sequence's end do not count), as
  lists: per_step [T][M], per_batch [M], per_token [M]."""
  steps = max((len(n) for n in new), default=0)
  if steps == 0:
    return {"per_step": [], "per_batch": [], "per_token": []}
  length = max(len(p) for p in prompts) + steps
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  real = np.zeros((len(prompts), steps), bool)
  for i, (p, n) in enumerate(zip(prompts, new)):
    tokens[i, : len(p) + len(n)] = list(p) + list(n)
  index, valid = pregate_choices(model_cfg, params, jnp.asarray(tokens))  # [B, L, M, K]
  pos = np.stack([len(p) + np.arange(steps) for p in prompts])  # [B, T] new tokens
  for i, n in enumerate(new):
    real[i, : len(n)] = True
  rows = np.arange(len(prompts))[:, None]
  step_index = jnp.swapaxes(index[rows, np.minimum(pos, length - 1)], 0, 1)  # [T, B, M, K]
  step_valid = jnp.swapaxes(valid[rows, np.minimum(pos, length - 1)], 0, 1)
  step_valid = step_valid & jnp.asarray(real.T)[:, :, None, None]
  out = distinct_experts(step_index, step_valid, model_cfg.moe.num_experts)
  return {k: np.asarray(v).tolist() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if bool(args.prompt) == bool(args.prompt_ids):
    print("error: give --prompt or --prompt_ids (one kind)", file=sys.stderr)
    return 2
  try:
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    contrast = None
    if args.decoding == "scmoe":
      contrast = ContrastConfig(args.scmoe_beta, args.scmoe_alpha, args.scmoe_weak)
    exp, params, step = load_run(args.workdir, args.step, args.one_device, args.tokenizer)
    tok = load_tokenizer(exp.config.data.tokenizer)
    model = Transformer(inference_model_config(exp.model_cfg, exp.mesh), mesh=exp.mesh)
    if args.prompt:
      bos = [] if tok.bos_id is None else [tok.bos_id]
      prompts = [bos + list(tok.encode(text)) for text in args.prompt]
    else:
      prompts = args.prompt_ids
    new = generate_tokens(
      model,
      params,
      prompts,
      args.max_new_tokens,
      sampling,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
      seed=args.seed,
      contrast=contrast,
    )
    if args.report_experts:
      moe = exp.model_cfg.moe
      if moe is None or moe.router != "pregate":
        raise ValueError("--report_experts needs a run with model.moe.router='pregate'")
      report = expert_lookahead_report(exp.model_cfg, params, prompts, new, tok.pad_id)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.report_experts:
    per_step = report["per_step"]
    mean_step = [sum(col) / len(per_step) for col in zip(*per_step)] if per_step else []
    print(
      "experts read per MoE layer (known before the layers run): per decode step "
      f"{[round(v, 2) for v in mean_step]} (mean over steps), per batch "
      f"{report['per_batch']}, per token {[round(v, 2) for v in report['per_token']]}",
      file=sys.stderr,
    )
  for i, ids in enumerate(new):
    if args.json:
      record = {"step": step, "prompt_ids": prompts[i], "new_ids": ids}
      if args.prompt:
        record.update(prompt=args.prompt[i], completion=tok.decode(ids))
      print(json.dumps(record))
    elif args.prompt:
      print(args.prompt[i] + tok.decode(ids))
    else:
      print(",".join(str(t) for t in ids))
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
