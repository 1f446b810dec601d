"""The ``Trainer``: data -> sharded train step -> metrics, eval, checkpoints.

Guarantees:
- exact resume: the state, optimizer state and every host's input position are saved
  together, so a run resumed from step N reproduces the uninterrupted run's losses;
- nothing lost on interruption: SIGTERM/SIGINT finish the current step, save and exit;
- a non-finite loss or gradient stops the run (nan_policy='stop') before anything is
  saved, naming the step and the router metrics of each MoE layer, or skips the update
  (nan_policy='skip'; ``train.max_consecutive_skips`` skips in a row stop it);
- one trainer per workdir (``lock``); a resume refuses shape-changing config edits
  (``resume``) and drops the replayed steps' metrics records.
The workdir may be a local folder or an object-store URI (``paths``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from moejax.data import make_eval_iterator, make_train_iterator
from moejax.training.checkpoint import Checkpointer
from moejax.training.experiment import Experiment, build_experiment
from moejax.training.faults import maybe_crash
from moejax.training.flops import model_flops, peak_flops, throughput
from moejax.training.lock import WorkdirLock, WorkdirLocked, owner_id
from moejax.training.metrics_log import MetricsWriter, router_summary, summarize
from moejax.training.paths import as_path
from moejax.training.preemption import PreemptionGuard
from moejax.training.resume import check_compatible
from moejax.training.state import count_params, create_train_state
from moejax.training.step import make_eval_step, make_train_step, mean_eval_loss
from moejax.training.workdir import (
  CONFIG_FILE,
  fresh_state,
  load_run_config,
  restore_state,
  save_run_config,
)

log = logging.getLogger("moejax.train")

CONSOLE_KEYS = (
  "loss",
  "ce_loss",
  "aux/load_balance_loss",
  "aux/z_loss",
  "grad_norm",
  "learning_rate",
)


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN/Inf and nan_policy is 'stop', or
  train.max_consecutive_skips steps in a row were skipped (nan_policy='skip')."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  losses: dict[int, float]  # step (1-based: after that many updates) -> train loss
  eval_losses: dict[int, float]
  stopped_by: str  # 'completed' | 'preempted:SIGTERM' | 'max_steps'
  num_params: int
  skipped_steps: int = 0  # non-finite steps whose update was skipped (nan_policy='skip')
  run_id: str = ""


def new_run_id() -> str:
  """'20260101-120000-1a2b3c': when this trainer started, plus a random suffix."""
  return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _agree(value: bool) -> bool:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _global_batch(local: dict, sharding) -> dict:
  """Per-host numpy batch -> one global jax.Array per key, laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _diverged_message(step: int, metrics: dict) -> str:
  lines = [
    f"Non-finite training loss/gradient at step {step} "
    f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])})."
  ]
  offending = sorted(
    {
      k.split("/")[1]
      for k in metrics
      if k.startswith("router/") and not np.all(np.isfinite(np.asarray(metrics[k], np.float64)))
    }
  )
  if offending:
    lines.append(f"Non-finite router metrics first appear in MoE layer(s): {offending}.")
  lines.append("Per-layer router metrics and aux losses at that step:")
  for k in sorted(metrics):
    if k.startswith(("router/", "aux/")):
      v = np.asarray(metrics[k])
      shown = f"{float(v):.6g}" if v.ndim == 0 else np.array2string(v, precision=3)
      lines.append(f"  {k} = {shown}")
  lines.append(
    "The last good checkpoint is untouched; lower the learning rate, raise "
    "moe.z_loss_weight, or set train.nan_policy='skip'."
  )
  return "\n".join(lines)


def evaluate(eval_step, params, data_cfg, batch_spec, num_batches: int) -> float:
  """Mean token cross-entropy over the first `num_batches` eval batches."""
  it = make_eval_iterator(data_cfg, jax.process_index(), jax.process_count())
  batches = (_global_batch(local, batch_spec) for local in itertools.islice(it, num_batches))
  return mean_eval_loss(eval_step, params, batches)


@dataclasses.dataclass(frozen=True)
class Hook:
  """``fn(trainer, step)`` after every `every`-th step (never if every == 0), and also after
  the last step of this ``run`` call (at_end='call') or of the whole run (at_end='run')."""

  every: int
  fn: Callable[[Trainer, int], None]
  at_end: str | None = None


class Trainer:
  """Owns the train state, the jitted steps, the checkpointer and the hooks of one run.

  ``run()`` dispatches a step, then runs the hooks due at that step: log (every
  ``train.log_every``), eval (``train.eval_every``) and save (``train.checkpoint_every``);
  extra hooks go through ``add_hook``. Device metrics are fetched lazily (``flush``), so
  step N+1 is dispatched before step N's metrics are read.
  """

  def __init__(
    self,
    config,
    workdir,
    resume: bool = True,
    show_progress: bool = True,
    devices=None,
    init_from=None,
    profile_steps: tuple[int, int] | None = None,
  ):
    """`workdir`: local path or URI. `init_from`: a run whose newest params start a run that
    has no checkpoint yet (fresh optimizer, step 0). `profile_steps` (a, b): a jax.profiler
    trace of steps a..b into workdir/profile."""
    self.exp: Experiment = build_experiment(config, devices=devices)  # ConfigError first
    self.cfg = self.exp.config  # ExperimentConfig
    self.workdir = as_path(workdir)
    self.devices = devices
    self.show_progress = show_progress
    self.profile_steps = profile_steps
    self.primary = jax.process_index() == 0
    self.run_id = new_run_id()
    self.lock = self._acquire_lock()
    try:
      self._setup(resume, init_from)
    except BaseException:
      if hasattr(self, "checkpointer"):
        self.checkpointer.close()
      self.lock.release()
      raise

  def _acquire_lock(self) -> WorkdirLock:
    """Process 0 takes the workdir lock; every process raises WorkdirLocked if it could not."""
    lock = WorkdirLock(self.workdir, owner_id(self.run_id), self.cfg.train.lock_timeout_s)
    error = None
    if self.primary:
      try:
        lock.acquire()
      except (WorkdirLocked, OSError) as e:  # every process must hear about a failure
        error = e
    if not _agree(error is None):
      raise error or WorkdirLocked(f"{self.workdir} is in use by another trainer (see process 0)")
    return lock

  def _setup(self, resume: bool, init_from) -> None:
    tcfg = self.cfg.train
    self.checkpointer = Checkpointer(
      self.workdir / "checkpoints",
      keep=tcfg.keep_checkpoints,
      async_save=tcfg.async_checkpointing,
    )
    if resume and self.checkpointer.all_steps() and (self.workdir / CONFIG_FILE).exists():
      check_compatible(load_run_config(self.workdir), self.cfg)
    self.train_iter = make_train_iterator(self.cfg.data, jax.process_index(), jax.process_count())
    self.state, self.start = self._restore_or_init(resume, init_from)
    self.writer = MetricsWriter(
      self.workdir, enabled=self.primary, run_id=self.run_id, tensorboard=tcfg.tensorboard
    )
    dropped = self.writer.truncate_after(self.start)  # records of steps replayed from here
    if dropped:
      log.info("Dropped %d metrics records past the resumed step %d", dropped, self.start)
    self.last_saved = self.start if self.restored else None
    self.step_no = self.start  # updates dispatched so far
    self.num_params = count_params(self.state.params)
    self.flops = model_flops(self.state.params, self.exp.model_cfg, self.cfg.data.seq_len)
    self.peak_flops = peak_flops(self.exp.mesh.devices.flat[0])
    shardings, batch_spec = self.exp.state_shardings, self.exp.batch_sharding
    self.train_step = jax.jit(
      make_train_step(
        self.exp.model,
        self.exp.tx,
        self.exp.schedule,
        tcfg.nan_policy,
        microbatches=tcfg.microbatches,
      ),
      in_shardings=(shardings, batch_spec),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
    )
    self.eval_step = jax.jit(
      make_eval_step(self.exp.model), in_shardings=(shardings.params, batch_spec)
    )
    self.losses: dict[int, float] = {}
    self.eval_losses: dict[int, float] = {}
    self.skipped_steps = 0
    self.consecutive_skips = 0
    self.pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked
    self.hooks = [
      Hook(tcfg.log_every, Trainer.log, at_end="call"),
      Hook(tcfg.eval_every, Trainer.eval, at_end="run"),
      Hook(tcfg.checkpoint_every, Trainer.save),
    ]
    self._window = (time.perf_counter(), 0)  # (start time, steps) of the throughput window
    self._profiling = False
    self._last_flushed: tuple[int, dict] | None = None

  def add_hook(
    self, every: int, fn: Callable[[Trainer, int], None], at_end: str | None = None
  ) -> None:
    self.hooks.append(Hook(every, fn, at_end))

  def _restore_or_init(self, resume: bool, init_from):
    restored = self.checkpointer.restore_latest(self.exp.abstract_state) if resume else None
    self.restored = restored is not None
    if restored is not None:
      state, data_state, start = restored
      self.train_iter.set_state(data_state)
      log.info("Resumed from checkpoint step %d in %s", start, self.checkpointer.directory)
      return state, start
    if self.checkpointer.all_steps():
      raise FileExistsError(
        f"{self.workdir} already holds checkpoints "
        f"{self.checkpointer.all_steps()}; pass --resume or use a fresh "
        "--workdir"
      )
    if init_from is not None:
      return self._init_from(init_from), 0
    state = create_train_state(
      self.exp.model,
      self.exp.tx,
      self.cfg.data.seq_len,
      self.cfg.train.seed,
      self.exp.state_shardings,
    )
    return state, 0

  def _init_from(self, source) -> Any:
    """Step-0 state holding the newest verified params of run `source` (restored on this
    run's mesh) and a fresh optimizer state."""
    source_cfg = load_run_config(source)
    check_compatible(source_cfg, self.cfg, what="initialise from")
    on_this_mesh = dataclasses.replace(source_cfg, mesh=self.cfg.mesh)
    state, _, step, _ = restore_state(on_this_mesh, source, devices=self.devices)
    log.info("Initialised from step %d of %s (fresh optimizer state)", step, source)
    return fresh_state(self.exp, state.params)

  # ---------------------------------------------------------------- steps and hooks

  def step(self) -> int:
    """Dispatches one train step; returns the new step number (metrics stay on device)."""
    batch = _global_batch(next(self.train_iter), self.exp.batch_sharding)
    self.state, dev_metrics = self.train_step(self.state, batch)
    self.step_no += 1
    self.pending.append((self.step_no, dev_metrics))
    return self.step_no

  def flush(self) -> tuple[int, dict] | None:
    """Fetches pending metrics and records losses; raises TrainingDiverged on a non-finite
    step when nan_policy is 'stop'. Returns the last (step, metrics)."""
    last = None
    for step_no, dev_metrics in self.pending:
      metrics = jax.device_get(dev_metrics)
      loss = float(metrics["loss"])
      finite = math.isfinite(loss) and math.isfinite(float(metrics["grad_norm"]))
      if not finite and self.cfg.train.nan_policy == "stop":
        raise TrainingDiverged(_diverged_message(step_no, metrics))
      skipped = float(metrics.get("skipped", 0.0)) > 0
      self.skipped_steps += skipped
      self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
      if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
        raise TrainingDiverged(
          f"{self.consecutive_skips} consecutive non-finite steps skipped up to step {step_no} "
          f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}): the run "
          f"diverged. {self.skipped_steps} steps skipped in all; the last good checkpoint "
          "is untouched."
        )
      self.losses[step_no] = loss
      last = (step_no, metrics)
    self.pending.clear()
    self._last_flushed = last or self._last_flushed
    return self._last_flushed

  def log(self, step_no: int) -> None:
    last = self.flush()
    start, steps = self._window
    elapsed = time.perf_counter() - start
    tokens_per_step = self.cfg.data.global_batch_size * self.cfg.data.seq_len
    record = dict(last[1], step=step_no, tokens_per_s=steps * tokens_per_step / max(elapsed, 1e-9))
    record.update(router_summary(record))
    flops_per_token = self.flops.train_flops_per_token(record.get("mean_experts_per_token"))
    record.update(
      throughput(flops_per_token, record["tokens_per_s"], self.exp.mesh.size, self.peak_flops)
    )
    record["skipped_steps"] = self.skipped_steps
    self.writer.write(record)
    self.progress.set_postfix_str(console_line(record, short=True))
    if self.primary and not self.show_progress:
      log.info("step %d: %s", step_no, console_line(record))
    self._window = (time.perf_counter(), 0)

  def eval(self, step_no: int) -> None:
    loss = evaluate(
      self.eval_step,
      self.state.params,
      self.cfg.data,
      self.exp.batch_sharding,
      self.cfg.train.eval_steps,
    )
    self.eval_losses[step_no] = loss
    self.writer.write(
      {"step": step_no, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    )
    if self.primary:
      tqdm.write(f"step {step_no}: eval_loss={loss:.4f}")

  def _profile(self, step_no: int, starting: bool) -> None:
    """Starts the jax.profiler trace before step a / stops it after step b."""
    if self.profile_steps is None:
      return
    first, last = self.profile_steps
    if starting and step_no == first and not self._profiling:
      try:
        jax.profiler.start_trace(str(self.workdir / "profile"))
        self._profiling = True
      except Exception as e:  # noqa: BLE001 — a profile is never worth the run
        log.warning("No profile: jax.profiler could not write to %s: %s", self.workdir, e)
    elif not starting and step_no >= last and self._profiling:
      self.flush()  # wait for the traced steps to finish
      jax.block_until_ready(self.state)
      jax.profiler.stop_trace()
      self._profiling = False
      log.info("Wrote a profile of steps %d..%d to %s/profile", first, last, self.workdir)

  def save(self, step_no: int) -> None:
    self.flush()  # never checkpoint a diverged state
    self.checkpointer.save(step_no, self.state, self.train_iter.get_state())
    self.last_saved = step_no
    maybe_crash("during_save", step_no)

  def close(self) -> None:
    """Finishes pending saves, flushes the metrics and releases the workdir lock (``run``
    does this itself; call it for a Trainer that is not run)."""
    if self._profiling:
      jax.profiler.stop_trace()
      self._profiling = False
    self.checkpointer.close()
    self.writer.close()
    self.lock.release()

  def _due(self, hook: Hook, step_no: int, end: int) -> bool:
    last = {"call": end, "run": self.cfg.train.steps}.get(hook.at_end)
    return hook.every > 0 and (step_no % hook.every == 0 or step_no == last)

  # ---------------------------------------------------------------- the run

  def run(self, max_steps: int | None = None) -> TrainResult:
    """Trains to ``train.steps`` (or `max_steps` more steps), saving at the end; SIGTERM /
    SIGINT finish the current step, save and return."""
    steps = self.cfg.train.steps
    end = steps if max_steps is None else min(steps, self.start + max_steps)
    stopped_by = "completed" if end == steps else "max_steps"
    log.info(
      "Process %d of %d processes: mesh %s over %d devices (%d local)",
      jax.process_index(),
      jax.process_count(),
      dict(self.exp.mesh.shape),
      self.exp.mesh.size,
      jax.local_device_count(),
    )
    if self.primary:
      save_run_config(self.cfg, self.workdir)  # what the tools (convert, analysis) read back
      log.info("Model: %s parameters; run id %s", f"{self.num_params:,}", self.run_id)
    self.progress = tqdm(
      total=steps,
      initial=self.start,
      disable=not (self.primary and self.show_progress),
      desc="train",
      unit="step",
      dynamic_ncols=True,
    )
    self._window = (time.perf_counter(), 0)
    with PreemptionGuard() as guard:
      try:
        while self.step_no < end:
          self._profile(self.step_no + 1, starting=True)
          step_no = self.step()
          self._profile(step_no, starting=False)
          maybe_crash("after_step", step_no)
          self._window = (self._window[0], self._window[1] + 1)
          self.progress.update(1)
          for hook in self.hooks:
            if self._due(hook, step_no, end):
              hook.fn(self, step_no)
          if guard.should_stop():
            stopped_by = f"preempted:{guard.signal_name or 'remote'}"
            log.warning("%s received: saving step %d and exiting", stopped_by, step_no)
            break
        final = int(jax.device_get(self.state.step))
        if self.last_saved != final:
          self.save(final)
      finally:
        self.progress.close()
        self.close()
    return TrainResult(
      final_step=final,
      losses=self.losses,
      eval_losses=self.eval_losses,
      stopped_by=stopped_by,
      num_params=self.num_params,
      skipped_steps=self.skipped_steps,
      run_id=self.run_id,
    )


def console_line(record: dict, short: bool = False) -> str:
  """'loss=2.31 mfu=41.2% tok/s=1.2e+05 load=0.31/0.19 dropped=0.002 ...' of a log record."""
  parts = [summarize(record, ("loss",))]
  if "mfu" in record:
    parts.append(f"mfu={100 * record['mfu']:.1f}%")
  parts.append(f"tok/s={record['tokens_per_s']:.3g}")
  if "max_expert_load" in record:
    parts.append(f"load={record['max_expert_load']:.2f}/{record['min_expert_load']:.2f}")
  if "mean_dropped_fraction" in record:
    parts.append(f"dropped={record['mean_dropped_fraction']:.3f}")
  if not short:
    parts.append(summarize(record, CONSOLE_KEYS[1:]))
    parts.append(f"tflops/device={record['tflops_per_device']:.3g}")
  if record.get("skipped_steps"):
    parts.append(f"skipped={record['skipped_steps']}")
  return " ".join(p for p in parts if p)


def train(
  config,
  workdir,
  resume: bool = True,
  max_steps: int | None = None,
  show_progress: bool = True,
  devices=None,
  init_from=None,
  profile_steps: tuple[int, int] | None = None,
) -> TrainResult:
  """Trains `config` in `workdir` (a path or URI: checkpoints/, config.json, metrics.jsonl,
  TensorBoard events).

  Args:
    config: an ExperimentConfig or a ConfigDict (parsed once here).
    resume: restore the newest usable checkpoint in the workdir if there is one.
    max_steps: stop (after checkpointing) once this many steps ran in *this* call;
      for tests and time-sliced jobs. None trains to ``train.steps``.
    devices: devices for the mesh (default: all of them).
    init_from: a run (e.g. written by moejax-convert / moejax-experts) whose params start
      this run when it has no checkpoint yet.
    profile_steps: (a, b): jax.profiler trace of steps a..b into workdir/profile.
  """
  trainer = Trainer(
    config,
    workdir,
    resume=resume,
    show_progress=show_progress,
    devices=devices,
    init_from=init_from,
    profile_steps=profile_steps,
  )
  return trainer.run(max_steps)
