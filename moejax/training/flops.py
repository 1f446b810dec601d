"""Model FLOPs and MFU (model FLOPs utilisation; Chowdhery et al., 2022, PaLM app. B).

Training FLOPs per token = 6 x (matmul parameters a token passes through) + 12 x layers x
heads x head width x seq_len (attention scores and values, the full L x L product). MoE
layers count only the experts that actually process a token -- the measured
``experts_per_token`` (null experts compute nothing, top-p a variable number, dropped
assignments nothing) -- and the router. Embedding lookups are free; the LM head counts.
Rematerialisation is not counted (model, not hardware, FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ModelConfig

EXPERT_KERNELS = ("wi_gate", "wi_up", "wo")

# Dense bf16 peak FLOP/s of one device, matched in order against lower-cased device_kind.
PEAK_FLOPS = (
  (("v6 lite", "v6e"), 918e12),
  (("v5p",), 459e12),
  (("v5 lite", "v5e", "v5litepod"), 197e12),
  (("tpu v5",), 459e12),
  (("tpu v4",), 275e12),
  (("h200",), 989e12),
  (("h100 pcie",), 756e12),
  (("h100",), 989e12),
  (("a100",), 312e12),
)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  """Parameter counts that set the FLOPs of one token (forward: 2 per parameter)."""

  dense_params: int  # matmul params every token uses (attention, dense FFN, router, LM head)
  expert_params: int  # params of ONE routed expert, summed over the MoE layers
  attention_fwd: int  # forward FLOPs of the attention products per token, all layers
  num_experts: int
  default_experts_per_token: float  # the configured top_k (0 for a dense model)

  def train_flops_per_token(self, experts_per_token: float | None = None) -> float:
    """Forward + backward (3x forward) FLOPs of one token; `experts_per_token` defaults to
    the configured top_k."""
    ept = self.default_experts_per_token if experts_per_token is None else experts_per_token
    return 6.0 * (self.dense_params + ept * self.expert_params) + 3.0 * self.attention_fwd


def model_flops(params, model_cfg: ModelConfig, seq_len: int) -> ModelFlops:
  """ModelFlops of a model from its (abstract or real) params tree and its config."""
  moe = model_cfg.moe
  stacked = 1 if model_cfg.scan_layers else 0
  dense = expert = 0
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
  has_head = any(n.startswith("lm_head/") for n in names)
  for name, (_, leaf) in zip(names, leaves):
    parts = name.split("/")
    size = math.prod(leaf.shape)
    if parts[-1] == "embedding":
      dense += size if not has_head else 0  # tied: the table is also the LM head
    elif len(leaf.shape) - stacked < 2:
      continue  # norm scales, biases: no matmul
    elif (
      moe is not None
      and parts[-1] in EXPERT_KERNELS
      and "shared" not in parts
      and len(leaf.shape) - stacked == 3
    ):
      expert += size // moe.num_experts
    else:
      dense += size
  if model_cfg.attention == "mla":
    qk, v = model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim, model_cfg.v_head_dim
  else:
    qk = v = model_cfg.head_dim
  attention = model_cfg.num_layers * 2 * seq_len * model_cfg.num_heads * (qk + v)
  return ModelFlops(
    dense_params=dense,
    expert_params=expert,
    attention_fwd=attention,
    num_experts=moe.num_experts if moe is not None else 0,
    default_experts_per_token=float(moe.top_k) if moe is not None else 0.0,
  )


@functools.lru_cache(maxsize=None)
def measured_peak_flops(n: int = 512, repeats: int = 5) -> float:
  """FLOP/s of an f32 [n, n] x [n, n] matmul on the default device (best of `repeats`)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device from PEAK_FLOPS; measured for a CPU; None if unknown."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return measured_peak_flops()
  kind = device.device_kind.lower()
  for keys, peak in PEAK_FLOPS:
    if any(k in kind for k in keys):
      return peak
  return None


def throughput(
  flops_per_token: float, tokens_per_s: float, num_devices: int, peak: float | None
) -> dict[str, float]:
  """{'tflops_per_device': model TFLOP/s per device, 'mfu': its fraction of `peak`}."""
  per_device = flops_per_token * tokens_per_s / num_devices
  out = {"tflops_per_device": per_device / 1e12}
  if peak:
    out["mfu"] = per_device / peak
  return out
