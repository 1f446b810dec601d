"""Scores a run's checkpoint on a split: loss, perplexity, bits per byte, router summary.

  python -m moejax.evaluate --workdir W [--step N] [--split validation] [--batches N] \
      [--json] [--one_device] [--tokenizer T --data_name NAME --data_dir DIR]

Reads ``--batches`` (default ``train.eval_steps``; 0 = the whole split) batches of the
in-order eval pass the trainer uses, so on a finished run it reproduces the trainer's
last ``eval_loss``. loss = sum_t m_t CE_t / sum_t m_t (nats per target token),
perplexity = e^loss, bits per token = loss / ln 2, bits per byte = sum_t m_t CE_t /
(ln 2 * sum_t m_t bytes(target_t)) (bytes of each token's text; special tokens 0).
The router summary is each MoE layer's metrics averaged over the batches.
--tokenizer / --data_name / --data_dir replace the run's ``data.*`` (e.g. to score an
imported HF model on your own prepared text with its own tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.data import make_eval_iterator
from moejax.data.tokenizer import load_tokenizer, token_byte_lengths
from moejax.errors import ConfigError
from moejax.inference.run import load_run
from moejax.training.step import token_cross_entropy


@dataclasses.dataclass(frozen=True)
class EvalResult:
  loss: float
  perplexity: float
  bits_per_token: float
  bits_per_byte: float | None  # None when the targets hold no byte (e.g. only specials)
  tokens: int
  bytes: int
  batches: int
  split: str
  router: dict[str, dict[str, Any]]  # 'layers_i' -> metric -> float or list

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    bpb = "n/a" if self.bits_per_byte is None else f"{self.bits_per_byte:.4f}"
    lines = [
      f"{self.split}: loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  "
      f"bits/token {self.bits_per_token:.4f}  bits/byte {bpb}  "
      f"({self.tokens} tokens, {self.batches} batches)"
    ]
    for layer, metrics in self.router.items():
      shown = []
      for k, v in metrics.items():
        shown.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}=[{_span(v)}]")
      lines.append(f"  {layer}: " + "  ".join(shown))
    return "\n".join(lines)


def _span(values: list) -> str:
  arr = np.asarray(values, np.float64)
  return f"min {arr.min():.3g} max {arr.max():.3g}"


def make_score_step(model, byte_lengths: np.ndarray):
  """score(params, batch) -> ce_sum, tokens, bytes and the per-layer router metrics."""
  table = jnp.asarray(byte_lengths, jnp.float32)  # [V_tok]

  def score(params, batch):
    logits, aux = model.apply({"params": params}, batch["inputs"], task_id=batch.get("task_id"))
    per_token = token_cross_entropy(logits, batch["targets"])  # [B, L]
    mask = batch["mask"]
    nbytes = jnp.take(table, jnp.clip(batch["targets"], 0, table.shape[0] - 1)) * mask
    return {
      "ce_sum": jnp.sum(per_token * mask),
      "tokens": jnp.sum(mask),
      "bytes": jnp.sum(nbytes),
      "router": aux["metrics"],
    }

  return score


def evaluate_params(exp, params, split: str | None = None, num_batches: int | None = None):
  """EvalResult of `params` (laid out for ``exp``) on ``split`` (default data.eval_split)
  over the first `num_batches` batches (default train.eval_steps; 0 = all)."""
  cfg = exp.config
  split = split or cfg.data.eval_split
  num_batches = cfg.train.eval_steps if num_batches is None else num_batches
  data_cfg = dataclasses.replace(cfg.data, eval_split=split)
  lengths = token_byte_lengths(load_tokenizer(cfg.data.tokenizer))
  step = jax.jit(
    make_score_step(exp.model, lengths),
    in_shardings=(exp.state_shardings.params, exp.batch_sharding),
  )
  sums = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  router: dict[str, dict[str, np.ndarray]] = {}
  batches = 0
  for local in make_eval_iterator(data_cfg, jax.process_index(), jax.process_count()):
    if num_batches and batches >= num_batches:
      break
    batch = {
      k: jax.make_array_from_process_local_data(exp.batch_sharding, v) for k, v in local.items()
    }
    out = jax.device_get(step(params, batch))
    for k in sums:
      sums[k] += float(out[k])
    for layer, metrics in out["router"].items():
      acc = router.setdefault(layer, {})
      for k, v in metrics.items():
        acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
    batches += 1
  loss = sums["ce_sum"] / max(sums["tokens"], 1.0)
  mean = lambda v: float(v / batches) if np.ndim(v) == 0 else (v / batches).tolist()
  return EvalResult(
    loss=loss,
    perplexity=math.exp(min(loss, 50.0)),
    bits_per_token=loss / math.log(2),
    bits_per_byte=sums["ce_sum"] / (math.log(2) * sums["bytes"]) if sums["bytes"] else None,
    tokens=int(sums["tokens"]),
    bytes=int(sums["bytes"]),
    batches=batches,
    split=split,
    router={layer: {k: mean(v) for k, v in m.items()} for layer, m in sorted(router.items())},
  )


def evaluate_run(
  workdir: str,
  step: int | None = None,
  split: str | None = None,
  num_batches: int | None = None,
  one_device: bool = False,
  data: dict | None = None,
) -> tuple[EvalResult, int]:
  """(EvalResult, step) of a run directory's checkpoint (newest unless `step`); `data`
  overrides fields of the run's ``data`` section."""
  exp, params, step = load_run(workdir, step, one_device, data=data)
  return evaluate_params(exp, params, split, num_batches), step


def evaluate_before_after(source: str, step: int | None, out: str, num_batches: int) -> dict:
  """``evaluate_run`` of `source` (at `step`) and of the new run `out` on the same
  `num_batches` eval batches: {'before': EvalResult json, 'after': ...}."""
  before, _ = evaluate_run(source, step, num_batches=num_batches)
  after, _ = evaluate_run(out, num_batches=num_batches)
  return {"before": before.to_json(), "after": after.to_json()}


def format_before_after(report: dict) -> str:
  """One line: eval loss (and bits per byte) before -> after."""
  b, a = report["before"], report["after"]
  line = f"eval on {b['tokens']} {b['split']} tokens: loss {b['loss']:.4f} -> {a['loss']:.4f}"
  if b["bits_per_byte"] is not None and a["bits_per_byte"] is not None:
    line += f", bits/byte {b['bits_per_byte']:.4f} -> {a['bits_per_byte']:.4f}"
  return line


def print_before_after(source: str, step: int | None, out: str, num_batches: int) -> None:
  """The CLIs' --eval_batches N: with N > 0, print ``format_before_after`` of `source` (at
  `step`) and the new run `out` on N eval batches; N = 0 prints nothing."""
  if num_batches:
    print(format_before_after(evaluate_before_after(source, step, out, num_batches)))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: newest).")
  p.add_argument("--split", default=None, help="Split (default: the run's data.eval_split).")
  p.add_argument("--batches", type=int, default=None, help="Default train.eval_steps; 0 = all.")
  p.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
  p.add_argument("--one_device", action="store_true", help="Run on a single device.")
  p.add_argument("--tokenizer", default=None, help="Override data.tokenizer.")
  p.add_argument("--data_name", default=None, help="Override data.name (a TFDS dataset).")
  p.add_argument("--data_dir", default=None, help="Override data.data_dir.")
  args = p.parse_args(argv)
  data = {"tokenizer": args.tokenizer, "name": args.data_name, "data_dir": args.data_dir}
  try:
    result, step = evaluate_run(
      args.workdir, args.step, args.split, args.batches, args.one_device, data
    )
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"step": step, **result.to_json()}))
  else:
    print(f"step {step} " + result.summary())
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
