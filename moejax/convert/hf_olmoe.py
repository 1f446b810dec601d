"""moejax <-> Hugging Face OLMoE (``olmoe``): config.json; the table is Qwen3-MoE's GQA one.

Target: transformers' ``OlmoeForCausalLM`` (Muennighoff et al., 2024): every layer MoE,
GQA whose q/k RMSNorms run over the whole projection width (moejax qk_norm='projection',
scales [H*D_h] / [H_kv*D_h]), then q, k, v clamped to [-clip_qkv, clip_qkv] when set, a
softmax router with top-k weights renormalised only when ``norm_topk_prob``.
"""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert import hf_mapping as mapping
from moejax.convert import hf_qwen3_moe as qwen
from moejax.convert.hf_mapping import expand
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "OlmoeForCausalLM"
MODEL_TYPE = "olmoe"
TABLE = qwen.gqa_table(qk_norm=True)

IMPLEMENTED = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "clip_qkv",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
  }
)
RULES = {
  "hidden_act": (lambda v: v == "silu", "'silu' (SwiGLU) only"),
  "attention_bias": (lambda v: not v, "false (no attention biases)"),
  "attention_dropout": (lambda v: not v, "0.0"),
}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF OLMoE config.json."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(f"config.json model_type={hf.get('model_type')!r} is not {MODEL_TYPE!r}")
  return ModelConfig.from_config(
    qwen.model_dict_from_hf(hf, "OLMoE", IMPLEMENTED, RULES, "projection"), path="model"
  )


def require_exportable(model_cfg) -> None:
  qwen.check_gqa_moe(model_cfg, "OLMoE", "projection", clip=True)
  if model_cfg.moe_every != 1 or model_cfg.first_moe_layer != 0:
    raise ConversionError(
      "this model cannot be exported as HF OLMoE: every layer must be MoE "
      "(model.moe_every=1, model.first_moe_layer=0)"
    )
  if model_cfg.num_heads * model_cfg.head_dim != model_cfg.d_model:
    raise ConversionError(
      "this model cannot be exported as HF OLMoE: model.num_heads * model.head_dim must equal "
      "model.d_model (OLMoE derives head_dim = hidden_size / num_attention_heads)"
    )


def hf_config(model_cfg) -> dict[str, Any]:
  m, moe = model_cfg, model_cfg.moe
  return {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": moe.expert_d_ff,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads,
    "num_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "norm_topk_prob": moe.router_order == "topk_softmax",
    "clip_qkv": m.clip_qkv,
    "hidden_act": "silu",
    "rms_norm_eps": m.rms_norm_eps,
    "rope_theta": m.rope_theta,
    "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
    "max_position_embeddings": m.max_len,
    "tie_word_embeddings": m.tie_embeddings,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "router_aux_loss_coef": moe.load_balance_weight,
    "output_router_logits": False,
    "torch_dtype": str(m.param_dtype),
    "dtype": str(m.param_dtype),
  }


def to_hf_tensors(params: dict, model_cfg):
  require_exportable(model_cfg)
  return mapping.to_hf_tensors(params, expand(TABLE, model_cfg), "OLMoE")


def from_hf_tensors(tensors, abstract_params, model_cfg) -> dict:
  tensors = mapping.defuse(tensors, qwen.expert_names)
  return mapping.from_hf_tensors(tensors, abstract_params, expand(TABLE, model_cfg))
