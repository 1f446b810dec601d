"""moejax <-> Hugging Face Qwen2-MoE (``qwen2_moe``): config.json; table from Qwen3-MoE's.

Target: transformers' ``Qwen2MoeForCausalLM``: GQA with q/k/v biases (moejax
attention_bias=True), softmax router -> top-k (renormalised when ``norm_topk_prob``), and
one shared expert of width ``shared_expert_intermediate_size`` whose output is scaled by
sigmoid(x . w_gate) (moejax num_shared_experts=1, shared_expert_d_ff, shared_expert_gate).
MoE layers follow ``decoder_sparse_step`` / ``mlp_only_layers`` as in Qwen3-MoE. Extra
tensors: ``self_attn.{q,k,v}_proj.bias`` <-> ``attn/{q,k,v}/bias`` [H(_kv), D_h],
``mlp.shared_expert.*_proj.weight`` <-> ``ffn/shared/*``, ``mlp.shared_expert_gate.weight``
[1, d] <-> ``ffn/shared_gate`` [d, 1].
"""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert import hf_mapping as mapping
from moejax.convert import hf_qwen3_moe as qwen
from moejax.convert.hf_mapping import expand
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"
TABLE = qwen.gqa_table(qk_norm=False, qkv_bias=True, shared=True)

IMPLEMENTED = (qwen.IMPLEMENTED - {"head_dim"}) | {
  "shared_expert_intermediate_size",
  "sliding_window",  # only read when use_sliding_window (rule below)
}
RULES = {
  "hidden_act": (lambda v: v == "silu", "'silu' (SwiGLU) only"),
  "qkv_bias": (lambda v: v is True, "true (moejax attention_bias=True)"),
  "use_sliding_window": (lambda v: not v, "false (full causal attention)"),
  "layer_types": (
    lambda v: v is None or all(t == "full_attention" for t in v),
    "every layer 'full_attention'",
  ),
  "attention_dropout": (lambda v: not v, "0.0"),
}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF Qwen2-MoE config.json."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(f"config.json model_type={hf.get('model_type')!r} is not {MODEL_TYPE!r}")
  model = qwen.model_dict_from_hf(hf, "Qwen2-MoE", IMPLEMENTED, RULES, "none")
  model["attention_bias"] = True
  model["moe"].update(
    num_shared_experts=1,
    shared_expert_d_ff=hf["shared_expert_intermediate_size"],
    shared_expert_gate=True,
  )
  return ModelConfig.from_config(model, path="model")


def require_exportable(model_cfg) -> None:
  m, moe, problems = model_cfg, model_cfg.moe, []
  if m.attention != "gqa" or m.qk_norm != "none" or m.clip_qkv is not None:
    problems.append("model.attention must be 'gqa' with qk_norm='none' and clip_qkv=None")
  if not m.attention_bias:
    problems.append("model.attention_bias must be True (Qwen2 q/k/v biases)")
  if moe is None or moe.router != "topk" or moe.activation != "silu":
    problems.append("model.moe.router must be 'topk' with activation 'silu'")
  elif not (moe.num_shared_experts == 1 and moe.shared_expert_gate) or moe.num_null_experts:
    problems.append(
      "model.moe needs num_shared_experts=1, shared_expert_gate=True and no null experts"
    )
  if m.moe_every != m.first_moe_layer + 1:
    problems.append("MoE layers must be (i + 1) % moe_every == 0 (first_moe_layer = moe_every - 1)")
  if m.num_heads * m.head_dim != m.d_model:
    problems.append("model.num_heads * model.head_dim must equal model.d_model")
  if problems:
    raise ConversionError("this model cannot be exported as HF Qwen2-MoE: " + "; ".join(problems))


def hf_config(model_cfg) -> dict[str, Any]:
  config = qwen.hf_config(model_cfg)
  moe = model_cfg.moe
  config.pop("head_dim")
  config.update(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    qkv_bias=True,
    shared_expert_intermediate_size=moe.shared_expert_d_ff or moe.expert_d_ff,
  )
  return config


def to_hf_tensors(params: dict, model_cfg):
  require_exportable(model_cfg)
  return mapping.to_hf_tensors(params, expand(TABLE, model_cfg), "Qwen2-MoE")


def from_hf_tensors(tensors, abstract_params, model_cfg) -> dict:
  tensors = mapping.defuse(tensors, qwen.expert_names)
  return mapping.from_hf_tensors(tensors, abstract_params, expand(TABLE, model_cfg))
