"""moejax <-> Hugging Face Qwen3-MoE (``qwen3_moe``): tensor table and config.json.

transformers' ``Qwen3MoeForCausalLM``: GQA with per-head q/k RMSNorm (moejax
qk_norm='head'), softmax router -> top-k, renormalised when ``norm_topk_prob`` (moejax
router_order='topk_softmax', else 'softmax_topk'), no shared experts. Layer i is MoE when
i not in ``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0; only sets of the
form {first_moe_layer + n * moe_every} convert.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moejax.config import ModelConfig
from moejax.convert import hf_mapping as mapping
from moejax.convert.hf_mapping import (
  DECODER_ROWS,
  FLAT,
  LINEAR_IN,
  LINEAR_OUT,
  TRANSPOSE,
  Row,
  expand,
)
from moejax.convert.hf_options import check_options
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
_L = "model.layers.{i}"
_FFN = (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))


def gqa_table(qk_norm: bool, qkv_bias: bool = False, shared: bool = False) -> tuple[Row, ...]:
  """The table of a Llama-style GQA model with softmax-routed experts (Qwen3-MoE, OLMoE;
  Qwen2-MoE adds q/k/v biases and a sigmoid-gated shared expert)."""
  norm = (
    Row("layers_{i}/attn/q_norm_scale", f"{_L}.self_attn.q_norm.weight", FLAT),
    Row("layers_{i}/attn/k_norm_scale", f"{_L}.self_attn.k_norm.weight", FLAT),
  )
  bias = tuple(
    Row(f"layers_{{i}}/attn/{n}/bias", f"{_L}.self_attn.{n}_proj.bias", FLAT) for n in "qkv"
  )
  shared_rows = (
    *(
      Row(f"layers_{{i}}/ffn/shared/{p}", f"{_L}.mlp.shared_expert.{w}.weight", TRANSPOSE, "moe")
      for p, w in _FFN
    ),
    Row("layers_{i}/ffn/shared_gate", f"{_L}.mlp.shared_expert_gate.weight", TRANSPOSE, "moe"),
  )
  return (
    *DECODER_ROWS,
    *(
      Row(f"layers_{{i}}/attn/{n}/kernel", f"{_L}.self_attn.{n}_proj.weight", LINEAR_IN)
      for n in "qkv"
    ),
    Row("layers_{i}/attn/o/kernel", f"{_L}.self_attn.o_proj.weight", LINEAR_OUT),
    *(norm if qk_norm else ()),
    *(bias if qkv_bias else ()),
    *(shared_rows if shared else ()),
    *(Row(f"layers_{{i}}/ffn/{p}", f"{_L}.mlp.{w}.weight", TRANSPOSE, "dense") for p, w in _FFN),
    Row("layers_{i}/ffn/router", f"{_L}.mlp.gate.weight", TRANSPOSE, "moe"),
    *(
      Row(f"layers_{{i}}/ffn/{p}", f"{_L}.mlp.experts.{{j}}.{w}.weight", TRANSPOSE, "expert")
      for p, w in _FFN
    ),
  )


TABLE = gqa_table(qk_norm=True)


def expert_names(i: int, j: int) -> tuple[str, str, str]:
  return tuple(f"model.layers.{i}.mlp.experts.{j}.{w}.weight" for _, w in _FFN)


IMPLEMENTED = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",  # what transformers 5 writes for num_experts
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "use_sliding_window",
    "max_window_layers",  # only read when use_sliding_window
  }
)
RULES = {
  "hidden_act": (lambda v: v == "silu", "'silu' (SwiGLU) only"),
  "sliding_window": (lambda v: v is None, "null (full causal attention; use_sliding_window=false)"),
  "attention_bias": (lambda v: not v, "false (no attention biases)"),
  "attention_dropout": (lambda v: not v, "0.0"),
}


def moe_layout(num_layers: int, step: int, mlp_only) -> tuple[int, int]:
  """(first_moe_layer, moe_every) whose MoE layers equal HF's
  {i : i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0}, or ConversionError."""
  moe = [i for i in range(num_layers) if i not in set(mlp_only) and (i + 1) % step == 0]
  if not moe:
    raise ConversionError("config.json has no MoE layer (decoder_sparse_step, mlp_only_layers)")
  first, every = moe[0], step
  if moe != list(range(first, num_layers, every)):
    raise ConversionError(
      f"config.json mlp_only_layers={list(mlp_only)!r} with decoder_sparse_step={step} makes "
      f"MoE layers {moe}, not every {every}-th layer from one first MoE layer as moejax needs"
    )
  return first, every


def model_dict_from_hf(
  hf: dict[str, Any], family: str, implemented, rules, qk_norm: str
) -> dict[str, Any]:
  """The ``model`` section (a plain dict, unvalidated) shared by the GQA softmax-MoE
  families; every unsupported option is a ConversionError naming it."""
  check_options(hf, family, implemented, rules)
  heads = hf["num_attention_heads"]
  layers = hf["num_hidden_layers"]
  first, every = moe_layout(
    layers, hf.get("decoder_sparse_step") or 1, hf.get("mlp_only_layers") or []
  )
  rope = hf.get("rope_parameters") or {}
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    d_ff=hf["intermediate_size"],
    moe_every=every,
    first_moe_layer=first,
    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_len=hf.get("max_position_embeddings", 4096),
    qk_norm=qk_norm,
    clip_qkv=hf.get("clip_qkv"),
    moe=dict(
      num_experts=hf.get("num_experts") or hf["num_local_experts"],
      expert_d_ff=hf.get("moe_intermediate_size") or hf["intermediate_size"],
      router="topk",
      top_k=hf["num_experts_per_tok"],
      router_order="topk_softmax" if hf.get("norm_topk_prob") else "softmax_topk",
      dropless=True,
      activation="silu",
      load_balance_weight=float(hf.get("router_aux_loss_coef", 0.001)),
    ),
  )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF Qwen3-MoE config.json."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(f"config.json model_type={hf.get('model_type')!r} is not {MODEL_TYPE!r}")
  return ModelConfig.from_config(
    model_dict_from_hf(hf, "Qwen3-MoE", IMPLEMENTED, RULES, "head"), path="model"
  )


def check_gqa_moe(model_cfg, family: str, qk_norm: str, clip: bool) -> None:
  """Raises ConversionError naming what a GQA softmax-MoE family cannot express."""
  moe, problems = model_cfg.moe, []
  if model_cfg.attention != "gqa":
    problems.append(f"model.attention={model_cfg.attention!r} must be 'gqa'")
  if model_cfg.qk_norm != qk_norm:
    problems.append(f"model.qk_norm={model_cfg.qk_norm!r} must be {qk_norm!r}")
  if model_cfg.clip_qkv is not None and not clip:
    problems.append(f"model.clip_qkv={model_cfg.clip_qkv!r} must be None")
  if model_cfg.attention_bias:
    problems.append("model.attention_bias must be False")
  if moe is None:
    problems.append("model.moe must be set")
  else:
    if moe.router != "topk":
      problems.append(f"model.moe.router={moe.router!r} must be 'topk'")
    if moe.activation != "silu":
      problems.append(f"model.moe.activation={moe.activation!r} must be 'silu'")
    if moe.num_shared_experts or moe.num_null_experts:
      problems.append(f"{family} has no shared or null experts")
  if problems:
    raise ConversionError(f"this model cannot be exported as HF {family}: " + "; ".join(problems))


def require_exportable(model_cfg) -> None:
  check_gqa_moe(model_cfg, "Qwen3-MoE", "head", clip=False)
  m = model_cfg
  if m.moe_every != m.first_moe_layer + 1:
    raise ConversionError(
      "this model cannot be exported as HF Qwen3-MoE: MoE layers must be "
      "(i + 1) % decoder_sparse_step == 0, i.e. model.first_moe_layer = model.moe_every - 1"
    )


def hf_config(model_cfg) -> dict[str, Any]:
  m, moe = model_cfg, model_cfg.moe
  return {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": m.d_ff,
    "moe_intermediate_size": moe.expert_d_ff,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads,
    "head_dim": m.head_dim,
    "num_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "norm_topk_prob": moe.router_order == "topk_softmax",
    "decoder_sparse_step": m.moe_every,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": m.rms_norm_eps,
    "rope_theta": m.rope_theta,
    "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
    "max_position_embeddings": m.max_len,
    "tie_word_embeddings": m.tie_embeddings,
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "router_aux_loss_coef": moe.load_balance_weight,
    "output_router_logits": False,
    "torch_dtype": str(m.param_dtype),
    "dtype": str(m.param_dtype),
  }


def to_hf_tensors(params: dict, model_cfg) -> dict[str, np.ndarray]:
  require_exportable(model_cfg)
  return mapping.to_hf_tensors(params, expand(TABLE, model_cfg), "Qwen3-MoE")


def from_hf_tensors(tensors, abstract_params, model_cfg) -> dict:
  tensors = mapping.defuse(tensors, expert_names)
  return mapping.from_hf_tensors(tensors, abstract_params, expand(TABLE, model_cfg))
