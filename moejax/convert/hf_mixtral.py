"""moejax <-> Hugging Face Mixtral: tensor table and config.json.

transformers' ``MixtralForCausalLM`` is moejax with moe_every=1, router='topk',
router_order='topk_softmax' (softmax over the selected logits == HF's softmax -> top-k ->
renormalise), dropless and SiLU experts. ``TABLE`` maps every tensor by reshape/transpose
(export -> import is bit-exact); import also accepts transformers 5's fused experts.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from moejax.config import ModelConfig
from moejax.convert import hf_mapping as mapping
from moejax.convert.hf_mapping import (
  DECODER_ROWS,
  LINEAR_IN,
  LINEAR_OUT,
  TRANSPOSE,
  Row,
  TensorMap,
  expand,
)
from moejax.convert.hf_options import check_options
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"

Array = np.ndarray
_L = "model.layers.{i}"
_W = (("wi_gate", "w1"), ("wi_up", "w3"), ("wo", "w2"))

TABLE = (
  *DECODER_ROWS,
  Row("layers_{i}/attn/q/kernel", f"{_L}.self_attn.q_proj.weight", LINEAR_IN),
  Row("layers_{i}/attn/k/kernel", f"{_L}.self_attn.k_proj.weight", LINEAR_IN),
  Row("layers_{i}/attn/v/kernel", f"{_L}.self_attn.v_proj.weight", LINEAR_IN),
  Row("layers_{i}/attn/o/kernel", f"{_L}.self_attn.o_proj.weight", LINEAR_OUT),
  Row("layers_{i}/ffn/router", f"{_L}.block_sparse_moe.gate.weight", TRANSPOSE, "moe"),
  *(
    Row(
      f"layers_{{i}}/ffn/{p}",
      f"{_L}.block_sparse_moe.experts.{{j}}.{w}.weight",
      TRANSPOSE,
      "expert",
    )
    for p, w in _W
  ),
)

# config.json keys mapped onto the moejax config (the others are rejected or metadata).
IMPLEMENTED = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
  }
)
RULES = {
  "hidden_act": (lambda v: v == "silu", "'silu' (SwiGLU experts) only"),
  "sliding_window": (lambda v: v is None, "null (full causal attention) only"),
  "attention_dropout": (lambda v: not v, "0.0 (no attention dropout)"),
  "router_jitter_noise": (lambda v: not v, "0.0 (no router jitter)"),
  "attention_bias": (lambda v: not v, "false (no attention biases)"),
}


def tensor_maps(cfg) -> list[TensorMap]:
  return expand(TABLE, cfg)


def require_exportable(model_cfg) -> None:
  """Raises ConversionError naming the config field that HF Mixtral cannot express."""
  moe = model_cfg.moe
  problems = []
  if getattr(model_cfg, "attention", "gqa") != "gqa":
    problems.append(f"model.attention={model_cfg.attention!r} must be 'gqa'")
  if moe is None or model_cfg.moe_every != 1 or model_cfg.first_moe_layer != 0:
    problems.append("every layer must be MoE (model.moe_every=1, model.first_moe_layer=0)")
  if model_cfg.qk_norm != "none" or model_cfg.clip_qkv is not None or model_cfg.attention_bias:
    problems.append(
      "model.qk_norm must be 'none', model.clip_qkv None and model.attention_bias False "
      "(Mixtral has none of them)"
    )
  if moe is not None:
    if moe.router != "topk":
      problems.append(f"model.moe.router={moe.router!r} must be 'topk'")
    if moe.router_order != "topk_softmax":
      problems.append(
        f"model.moe.router_order={moe.router_order!r} must be 'topk_softmax' "
        "(Mixtral renormalises the top-k weights)"
      )
    if moe.activation != "silu":
      problems.append(f"model.moe.activation={moe.activation!r} must be 'silu'")
    if moe.num_shared_experts or moe.num_null_experts:
      problems.append("Mixtral has no shared or null experts")
    if moe.num_compressed_experts:
      problems.append("Mixtral has no compressed experts (model.moe.num_compressed_experts)")
  if problems:
    raise ConversionError("this model cannot be exported as HF Mixtral: " + "; ".join(problems))


def hf_config(model_cfg) -> dict[str, Any]:
  """config.json contents for a moejax ModelConfig (after `require_exportable`)."""
  moe = model_cfg.moe
  return {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "vocab_size": model_cfg.vocab_size,
    "hidden_size": model_cfg.d_model,
    "intermediate_size": moe.expert_d_ff,
    "num_hidden_layers": model_cfg.num_layers,
    "num_attention_heads": model_cfg.num_heads,
    "num_key_value_heads": model_cfg.num_kv_heads,
    "head_dim": model_cfg.head_dim,
    "num_local_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "hidden_act": "silu",
    "rms_norm_eps": model_cfg.rms_norm_eps,
    "rope_theta": model_cfg.rope_theta,
    "rope_parameters": {"rope_theta": model_cfg.rope_theta, "rope_type": "default"},
    "max_position_embeddings": model_cfg.max_len,
    "tie_word_embeddings": model_cfg.tie_embeddings,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "router_jitter_noise": 0.0,
    "router_aux_loss_coef": moe.load_balance_weight,
    "output_router_logits": False,
    "torch_dtype": str(model_cfg.param_dtype),
    "dtype": str(model_cfg.param_dtype),
    "bos_token_id": 1,
    "eos_token_id": 2,
  }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF Mixtral config.json; every other option
  is rejected by name (``moejax.convert.hf_options``)."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"config.json model_type={hf.get('model_type')!r} is not supported "
      f"by the Mixtral converter (expected {MODEL_TYPE!r})"
    )
  check_options(hf, "Mixtral", IMPLEMENTED, RULES)
  rope = hf.get("rope_parameters") or {}
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  model = dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=head_dim,
    d_ff=hf["intermediate_size"],
    moe_every=1,
    first_moe_layer=0,
    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_len=hf.get("max_position_embeddings", 4096),
    moe=dict(
      num_experts=hf["num_local_experts"],
      expert_d_ff=hf["intermediate_size"],
      router="topk",
      top_k=hf["num_experts_per_tok"],
      router_order="topk_softmax",
      dropless=True,
      activation="silu",
      load_balance_weight=float(hf.get("router_aux_loss_coef", 0.01)),
    ),
  )
  return ModelConfig.from_config(model, path="model")


def to_hf_tensors(params: dict, model_cfg) -> dict[str, Array]:
  """moejax params (nested dict of arrays) -> {HF tensor name: numpy array}."""
  require_exportable(model_cfg)
  return mapping.to_hf_tensors(params, tensor_maps(model_cfg), "Mixtral")


def _expert_names(i: int, j: int) -> tuple[str, str, str]:
  return tuple(f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight" for _, w in _W)


_GATE_5X = re.compile(r"(model\.layers\.\d+)\.mlp\.gate\.weight")


def from_hf_tensors(tensors: dict[str, Array], abstract_params: dict, model_cfg) -> dict:
  """{HF tensor name: array} -> moejax params shaped like `abstract_params`; also accepts
  the transformers >= 5 in-memory names (``mlp.gate``, fused ``mlp.experts``)."""
  tensors = mapping.defuse(tensors, _expert_names)
  tensors = {_GATE_5X.sub(r"\1.block_sparse_moe.gate.weight", k): v for k, v in tensors.items()}
  return mapping.from_hf_tensors(tensors, abstract_params, tensor_maps(model_cfg))
