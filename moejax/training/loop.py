"""The training loop: data -> sharded train step -> metrics, eval, checkpoints.

Guarantees:
- exact resume: the state, optimizer state and every host's input position are saved
  together, so a run resumed from step N reproduces the uninterrupted run's losses;
- nothing lost on interruption: SIGTERM/SIGINT finish the current step, save and exit;
- a non-finite loss or gradient stops the run (nan_policy='stop') before anything is
  saved, naming the step and the router metrics of each MoE layer, or skips the update
  (nan_policy='skip').
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from moejax.convert.run_io import save_run_config
from moejax.data import make_eval_iterator, make_train_iterator
from moejax.training.checkpoint import Checkpointer
from moejax.training.experiment import build_experiment
from moejax.training.faults import maybe_crash
from moejax.training.metrics_log import MetricsWriter, router_summary, summarize
from moejax.training.preemption import PreemptionGuard
from moejax.training.state import count_params, create_train_state
from moejax.training.step import make_eval_step, make_train_step

log = logging.getLogger("moejax.train")

CONSOLE_KEYS = ("loss", "ce_loss", "aux/load_balance_loss", "aux/z_loss", "grad_norm",
                "learning_rate")


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN/Inf and nan_policy is 'stop'."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  losses: dict[int, float]  # step (1-based: after that many updates) -> train loss
  eval_losses: dict[int, float]
  stopped_by: str  # 'completed' | 'preempted:SIGTERM' | 'max_steps'
  num_params: int


def _global_batch(local: dict, sharding) -> dict:
  """Per-host numpy batch -> one global jax.Array per key, laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _diverged_message(step: int, metrics: dict) -> str:
  lines = [f"Non-finite training loss/gradient at step {step} "
           f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])})."]
  offending = sorted({k.split("/")[1] for k in metrics if k.startswith("router/")
                      and not np.all(np.isfinite(np.asarray(metrics[k], np.float64)))})
  if offending:
    lines.append(f"Non-finite router metrics first appear in MoE layer(s): {offending}.")
  lines.append("Per-layer router metrics and aux losses at that step:")
  for k in sorted(metrics):
    if k.startswith(("router/", "aux/")):
      v = np.asarray(metrics[k])
      shown = f"{float(v):.6g}" if v.ndim == 0 else np.array2string(v, precision=3)
      lines.append(f"  {k} = {shown}")
  lines.append("The last good checkpoint is untouched; lower the learning rate, raise "
               "moe.z_loss_weight, or set train.nan_policy='skip'.")
  return "\n".join(lines)


def evaluate(eval_step, params, data_cfg, batch_spec, num_batches: int) -> float:
  """Mean token cross-entropy over the first `num_batches` eval batches."""
  it = make_eval_iterator(data_cfg, jax.process_index(), jax.process_count())
  ce_sum, tokens = 0.0, 0.0
  for i, local in enumerate(it):
    if i >= num_batches:
      break
    out = jax.device_get(eval_step(params, _global_batch(local, batch_spec)))
    ce_sum += float(out["ce_sum"])
    tokens += float(out["tokens"])
  return ce_sum / max(tokens, 1.0)


def train(config, workdir: str, resume: bool = True, max_steps: int | None = None,
          show_progress: bool = True, devices=None) -> TrainResult:
  """Trains `config` in `workdir` (checkpoints in workdir/checkpoints, metrics.jsonl).

  Args:
    resume: restore the newest usable checkpoint in the workdir if there is one.
    max_steps: stop (after checkpointing) once this many steps ran in *this* call;
      for tests and time-sliced jobs. None trains to ``train.steps``.
    devices: devices for the mesh (default: all of them).
  """
  exp = build_experiment(config, devices=devices)
  tcfg = config.train
  primary = jax.process_index() == 0
  seq_len = config.data.seq_len
  shardings, batch_spec = exp.state_shardings, exp.batch_sharding
  checkpointer = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                              keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
  writer = MetricsWriter(workdir, enabled=primary)
  train_iter = make_train_iterator(config.data, jax.process_index(), jax.process_count())

  restored = checkpointer.restore_latest(exp.abstract_state) if resume else None
  if restored is not None:
    state, data_state, start = restored
    train_iter.set_state(data_state)
    log.info("Resumed from checkpoint step %d in %s", start, checkpointer.directory)
  else:
    if checkpointer.all_steps():
      raise FileExistsError(f"{workdir} already holds checkpoints {checkpointer.all_steps()};"
                            " pass --resume or use a fresh --workdir")
    state = create_train_state(exp.model, exp.tx, seq_len, tcfg.seed, shardings)
    start = 0
  num_params = count_params(state.params)
  log.info("Process %d of %d processes: mesh %s over %d devices (%d local)",
           jax.process_index(), jax.process_count(), dict(exp.mesh.shape), exp.mesh.size,
           jax.local_device_count())
  if primary:
    save_run_config(config, workdir)  # what the tools (convert, analysis) read back
    log.info("Model: %s parameters", f"{num_params:,}")

  train_step = jax.jit(make_train_step(exp.model, exp.tx, exp.schedule, tcfg.nan_policy,
                                       microbatches=tcfg.get("microbatches", 1)),
                       in_shardings=(shardings, batch_spec), out_shardings=(shardings, None),
                       donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(exp.model), in_shardings=(shardings.params, batch_spec))

  losses, eval_losses = {}, {}
  tokens_per_step = config.data.global_batch_size * seq_len
  end = tcfg.steps if max_steps is None else min(tcfg.steps, start + max_steps)
  stopped_by = "completed" if end == tcfg.steps else "max_steps"
  progress = tqdm(total=tcfg.steps, initial=start, disable=not (primary and show_progress),
                  desc="train", unit="step", dynamic_ncols=True)
  last_saved = start if restored is not None else None
  pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked
  window_start, window_steps = time.perf_counter(), 0

  def flush_pending() -> dict | None:
    """Fetches pending metrics, records losses; raises on a non-finite step."""
    last = None
    for step_no, dev_metrics in pending:
      metrics = jax.device_get(dev_metrics)
      loss = float(metrics["loss"])
      finite = math.isfinite(loss) and math.isfinite(float(metrics["grad_norm"]))
      if not finite and tcfg.nan_policy == "stop":
        raise TrainingDiverged(_diverged_message(step_no, metrics))
      losses[step_no] = loss
      last = (step_no, metrics)
    pending.clear()
    return last

  def save(step_no: int) -> None:
    nonlocal last_saved
    flush_pending()  # never checkpoint a diverged state
    checkpointer.save(step_no, state, train_iter.get_state())
    last_saved = step_no
    maybe_crash("during_save", step_no)

  with PreemptionGuard() as guard:
    try:
      for step in range(start, end):
        batch = _global_batch(next(train_iter), batch_spec)
        state, dev_metrics = train_step(state, batch)
        step_no = step + 1
        pending.append((step_no, dev_metrics))
        maybe_crash("after_step", step_no)
        window_steps += 1
        progress.update(1)
        if step_no % tcfg.log_every == 0 or step_no == end:
          last = flush_pending()
          elapsed = time.perf_counter() - window_start
          record = dict(last[1], step=step_no,
                        tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9))
          record.update(router_summary(record))
          writer.write(record)
          progress.set_postfix_str(summarize(record, ("loss", "grad_norm")))
          if primary and not show_progress:
            log.info("step %d: %s tokens/s=%.0f", step_no, summarize(record, CONSOLE_KEYS),
                     record["tokens_per_s"])
          window_start, window_steps = time.perf_counter(), 0
        if tcfg.eval_every and (step_no % tcfg.eval_every == 0 or step_no == tcfg.steps):
          eval_losses[step_no] = evaluate(eval_step, state.params, config.data, batch_spec,
                                          tcfg.eval_steps)
          writer.write({"step": step_no, "eval_loss": eval_losses[step_no],
                        "eval_perplexity": math.exp(min(eval_losses[step_no], 50.0))})
          if primary:
            tqdm.write(f"step {step_no}: eval_loss={eval_losses[step_no]:.4f}")
        if step_no % tcfg.checkpoint_every == 0:
          save(step_no)
        if guard.should_stop():
          stopped_by = f"preempted:{guard.signal_name or 'remote'}"
          log.warning("%s received: saving step %d and exiting", stopped_by, step_no)
          break
      final = int(jax.device_get(state.step))
      if last_saved != final:
        save(final)
    finally:
      progress.close()
      checkpointer.close()
  return TrainResult(final_step=final, losses=losses, eval_losses=eval_losses,
                     stopped_by=stopped_by, num_params=num_params)
