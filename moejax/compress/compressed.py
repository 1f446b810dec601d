"""Compressed Experts (He et al., 2025, "Efficiently Editing Mixture-of-Experts Models
with Compressed Experts"): a layer's J least important experts become compact vectors.

Importance as for pruning (EASY-EP or PreMoe). A removed expert e keeps its router column
and becomes its expected output c_e = sum_t S_{t,e} FFN_e(x_t) / sum_t S_{t,e} (S: e among
t's choices; the mean over all t if no token chose e), so a pick of e adds g_{t,e} c_e.
Router columns are [kept, compressed], each in their original order.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moejax.analysis.collect import moe_layer_inputs, split_batches
from moejax.analysis.workflows import collect_run, load_params, run_config
from moejax.compress.merge import EXPERT_PARAMS
from moejax.compress.prune import SCORERS, top_experts
from moejax.compress.workflows import _write_new_run, target_config
from moejax.config import ExperimentConfig, ModelConfig
from moejax.errors import config_error
from moejax.layers.ffn import expert_ffn
from moejax.layers.moe import to_groups
from moejax.layers.routed import router_logits
from moejax.models import Transformer
from moejax.routers import route
from moejax.training.step import make_eval_step, mean_eval_loss


def expert_output_sums(x: jax.Array, mask: jax.Array, ffn: dict, cfg) -> dict:
  """Per-expert sums for c_e over one batch: x [B, L, d], mask [B, L] ->
  {'selected' [E], 'out_sum' [E, d] (sum over tokens that chose e), 'all_sum' [E, d],
  'tokens' []}. Every expert runs on every token ('ned,edf' dense), fine for calibration."""
  e = cfg.num_experts
  xg = to_groups(x, cfg.group_size)  # [G, S, d]
  m = mask.reshape(xg.shape[:2]).astype(jnp.float32)
  routing = route(router_logits(xg, jnp.asarray(ffn["router"])), cfg, slots=False)
  chose = jax.nn.one_hot(routing.expert_index, e) * routing.valid[..., None]  # [G, S, K, E]
  chose = jnp.minimum(jnp.sum(chose, axis=2), 1.0) * m[..., None]  # [G, S, E]
  g, s, d = xg.shape
  n = g * s
  cast = lambda a: jnp.asarray(a, xg.dtype)
  y = expert_ffn(
    jnp.broadcast_to(xg.reshape(1, 1, n, d), (1, e, n, d)),  # every token in every expert
    cast(ffn["wi_gate"]),
    cast(ffn["wi_up"]),
    cast(ffn["wo"]),
    cfg.activation,
  )[0].astype(jnp.float32)  # [E, N, d]
  chose = chose.reshape(n, e)
  return {
    "selected": jnp.sum(chose, axis=0),
    "out_sum": jnp.einsum("ne,end->ed", chose, y),
    "all_sum": jnp.einsum("n,end->ed", m.reshape(n), y),
    "tokens": jnp.sum(m),
  }


@functools.lru_cache(maxsize=8)
def _sums_fn(model_cfg: ModelConfig):
  model = Transformer(model_cfg)

  def f(params, tokens, mask):
    _, inputs = moe_layer_inputs(model, params, tokens)
    return {
      i: expert_output_sums(x, mask, params[f"layers_{i}"]["ffn"], model_cfg.moe)
      for i, x in inputs.items()
    }

  return jax.jit(f)


def expected_outputs(model_cfg: ModelConfig, params, batches) -> dict[int, np.ndarray]:
  """{MoE layer i: c [E, d]}, each expert's mean output over the tokens that chose it
  (over all tokens where none did), accumulated over `batches` in float64."""
  fn, total = _sums_fn(model_cfg), None
  for batch in batches:
    tokens = np.asarray(batch["inputs"], np.int32)
    mask = np.asarray(batch.get("mask", np.ones(tokens.shape)), np.float32)
    new = jax.tree.map(
      lambda a: np.asarray(a, np.float64), jax.device_get(fn(params, tokens, mask))
    )
    total = new if total is None else jax.tree.map(np.add, total, new)
  if total is None:
    raise ValueError("no calibration batches")
  out = {}
  for i, s in total.items():
    chosen = s["out_sum"] / np.maximum(s["selected"], 1.0)[:, None]
    overall = s["all_sum"] / max(float(s["tokens"]), 1.0)
    out[i] = np.where((s["selected"] > 0)[:, None], chosen, overall)
  return out


def compress_ffn(ffn: dict, keep: list[int], vectors: np.ndarray) -> dict:
  """One layer's params with experts `keep` (ascending) full and the others compressed:
  [E, ...] tensors sliced, router columns reordered [kept, compressed], 'compressed'
  [J, d] = vectors of the removed experts in their original order."""
  e = np.asarray(ffn["wi_gate"]).shape[0]
  removed = [i for i in range(e) if i not in keep]
  out = dict(ffn)
  for name in EXPERT_PARAMS:
    out[name] = np.asarray(ffn[name])[keep]
  out["router"] = np.asarray(ffn["router"])[:, keep + removed]
  out["compressed"] = np.asarray(vectors[removed], np.asarray(ffn["wo"]).dtype)
  return out


def check_compressible(num_compressed: int, model_cfg: ModelConfig) -> None:
  moe = model_cfg.moe
  if moe.num_compressed_experts or moe.router not in ("topk", "shared_experts", "top_p"):
    raise config_error(
      "model.moe.router",
      moe.router,
      "compress needs a top-k, shared_experts or top_p model without compressed experts",
    )
  e = moe.num_experts
  if not isinstance(num_compressed, int) or not 1 <= num_compressed < e:
    raise config_error("num_compressed", num_compressed, f"must be an int in [1, {e - 1}]")


def compressed_config(config: ExperimentConfig, num_compressed: int) -> ExperimentConfig:
  """The config with `num_compressed` of its E experts compressed: E - J full, J vectors."""
  e = config.model.moe.num_experts
  return config.replace_fields(
    {
      "model.moe.num_experts": e - num_compressed,
      "model.moe.num_compressed_experts": num_compressed,
    }
  )


def compress_model(
  config: ExperimentConfig,
  model_cfg: ModelConfig,
  params,
  sums,
  vectors,
  num_compressed: int,
  method: str,
):
  """(new config, params, {layer: kept experts}, {layer: scores}); `sums` from
  ``moejax.analysis.collect`` (for the scores), `vectors` from ``expected_outputs``."""
  check_compressible(num_compressed, model_cfg)
  if method not in SCORERS:
    raise config_error("method", method, f"allowed: {sorted(SCORERS)}")
  e = model_cfg.moe.num_experts
  params = dict(flax.core.unfreeze(params))
  kept, scores = {}, {}
  for i in model_cfg.moe_layers:
    scores[i] = SCORERS[method](sums[i])
    kept[i] = top_experts(scores[i], e - num_compressed)
    layer = dict(params[f"layers_{i}"])
    layer["ffn"] = compress_ffn(layer["ffn"], kept[i], vectors[i])
    params[f"layers_{i}"] = layer
  return compressed_config(config, num_compressed), params, kept, scores


def eval_loss(model_cfg: ModelConfig, params, batches) -> float:
  """Mean masked next-token cross-entropy of the single-device model over `batches`."""
  step = jax.jit(make_eval_step(Transformer(model_cfg)))
  return mean_eval_loss(step, params, ({k: jnp.asarray(v) for k, v in b.items()} for b in batches))


def compress_run(
  workdir: str,
  out: str,
  num_compressed: int,
  method: str = "easy_ep",
  split: str = "train",
  num_batches: int = 4,
  eval_split: str = "validation",
  eval_batches: int = 4,
  step: int | None = None,
  mesh: dict | None = None,
  progress: bool = True,
) -> dict:
  """Compresses every MoE layer's `num_compressed` least important experts (scored and
  averaged on `num_batches` batches of `split`); writes run `out`; returns a summary with
  the eval loss on `eval_batches` batches of `eval_split` before and after."""
  config, model_cfg = run_config(workdir)
  check_compressible(num_compressed, model_cfg)
  if method not in SCORERS:
    raise config_error("method", method, f"allowed: {sorted(SCORERS)}")
  target_config(compressed_config(config, num_compressed), out, mesh)  # fail before any work
  params, step = load_params(config, workdir, step)
  sums = collect_run(config, model_cfg, params, split, num_batches, progress)
  vectors = expected_outputs(model_cfg, params, split_batches(config, split, num_batches))
  new_config, new_params, kept, scores = compress_model(
    config, model_cfg, params, sums, vectors, num_compressed, method
  )
  new_config = target_config(new_config, out, mesh)
  new_model_cfg = dataclasses.replace(new_config.model, scan_layers=False)  # unrolled params
  before = eval_loss(model_cfg, params, split_batches(config, eval_split, eval_batches))
  after = eval_loss(new_model_cfg, new_params, split_batches(config, eval_split, eval_batches))
  summary = {
    "source": workdir,
    "step": step,
    "method": method,
    "num_compressed": num_compressed,
    "eval_loss_before": before,
    "eval_loss_after": after,
    "kept_experts": {str(i): k for i, k in kept.items()},
    "scores": {str(i): s.tolist() for i, s in scores.items()},
  }
  return _write_new_run(new_config, out, new_params, summary, "compress.json")
