"""moejax <-> Hugging Face DeepSeek-V3 (``deepseek_v3``): config.json; tensors as DeepSeek-V2.

transformers' ``DeepseekV3ForCausalLM`` (DeepSeek-AI, 2024): MLA with interleaved RoPE, the
first ``first_k_dense_replace`` layers dense, then sigmoid-routed DeepSeekMoE with the
selection bias ``mlp.gate.e_score_correction_bias`` (moejax router='deepseek_v3',
``ffn/router_bias``); tensors as ``hf_deepseek.TABLE``. Imported models train with
bias_update_rate = 0.001 and no balance loss; the multi-token-prediction module is skipped.
"""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert import hf_deepseek, hf_mapping
from moejax.convert.hf_options import check_options
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
DEFAULT_BIAS_UPDATE_RATE = 0.001  # DeepSeek-V3 Sec. 4.2, gamma for the first 14.3T tokens

IMPLEMENTED = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "qk_head_dim",
    "head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "num_nextn_predict_layers",  # MTP weights: not in transformers' forward
  }
)
RULES = {
  "hidden_act": (lambda v: v == "silu", "'silu' (SwiGLU) only"),
  "rope_interleave": (lambda v: v is True, "true (moejax MLA uses interleaved RoPE pairs)"),
  "attention_bias": (lambda v: not v, "false (no attention biases)"),
  "attention_dropout": (lambda v: not v, "0.0"),
  "pretraining_tp": (lambda v: v in (None, 1), "1"),
  "topk_method": (lambda v: v in (None, "noaux_tc"), "'noaux_tc'"),
  "scoring_func": (lambda v: v in (None, "sigmoid"), "'sigmoid'"),
  "moe_layer_freq": (lambda v: v in (None, 1), "1 (every layer from first_k_dense_replace on)"),
}


def tensor_maps(cfg):
  return hf_deepseek.tensor_maps(cfg)


def require_exportable(model_cfg) -> None:
  """Raises ConversionError naming the config fields HF DeepSeek-V3 cannot express."""
  moe, problems = model_cfg.moe, []
  if model_cfg.attention != "mla":
    problems.append(f"model.attention={model_cfg.attention!r} must be 'mla'")
  if moe is None or model_cfg.moe_every != 1:
    problems.append("every layer from model.first_moe_layer on must be MoE (model.moe_every=1)")
  if moe is not None:
    if moe.router != "deepseek_v3":
      problems.append(f"model.moe.router={moe.router!r} must be 'deepseek_v3'")
    if moe.activation != "silu":
      problems.append(f"model.moe.activation={moe.activation!r} must be 'silu'")
    if moe.num_shared_experts < 1:
      problems.append("model.moe.num_shared_experts must be >= 1")
    if moe.shared_expert_d_ff is not None or moe.shared_expert_gate:
      problems.append("model.moe.shared_expert_d_ff must be None and shared_expert_gate False")
  if problems:
    raise ConversionError("this model cannot be exported as HF DeepSeek-V3: " + "; ".join(problems))


def hf_config(model_cfg) -> dict[str, Any]:
  """config.json contents for a moejax ModelConfig (after `require_exportable`)."""
  config = hf_deepseek.hf_config(model_cfg)
  moe = model_cfg.moe
  for key in ("topk_method", "aux_loss_alpha", "moe_layer_freq", "mlp_bias"):
    config.pop(key)
  config.update(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    n_group=moe.n_group,
    topk_group=moe.topk_group,
    norm_topk_prob=moe.norm_topk_prob,
    rope_interleave=True,
    num_nextn_predict_layers=0,
  )
  return config


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF DeepSeek-V3 config.json."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"config.json model_type={hf.get('model_type')!r} is not supported "
      f"by the DeepSeek-V3 converter (expected {MODEL_TYPE!r})"
    )
  # RoPE (default or YaRN) is checked by DeepSeek-V2's ``rope_fields_from_hf``.
  unscaled = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}
  check_options(unscaled, "DeepSeek-V3", IMPLEMENTED, RULES)
  # Everything but the router is DeepSeek-V2's mapping (MLA, dense prefix, shared experts).
  v2 = {k: v for k, v in hf.items() if k not in IMPLEMENTED or k in _V2_KEYS}
  v2.update(
    model_type=hf_deepseek.MODEL_TYPE,
    rope_parameters=hf.get("rope_parameters"),
    rope_scaling=hf.get("rope_scaling"),
  )
  v2["rope_theta"] = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 1e4))
  for key in RULES:
    v2.pop(key, None)
  model = hf_deepseek.model_dict_from_hf(v2)
  model["moe"] = dict(
    num_experts=hf["n_routed_experts"],
    expert_d_ff=hf["moe_intermediate_size"],
    router="deepseek_v3",
    num_shared_experts=hf["n_shared_experts"],
    top_k=hf["num_experts_per_tok"],
    n_group=hf.get("n_group") or 1,
    topk_group=hf.get("topk_group") or 1,
    norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    dropless=True,
    activation="silu",
    load_balance_weight=0.0,
    z_loss_weight=0.0,
    bias_update_rate=DEFAULT_BIAS_UPDATE_RATE,
  )
  return ModelConfig.from_config(model, path="model")


_V2_KEYS = IMPLEMENTED - {
  "n_group",
  "topk_group",
  "norm_topk_prob",
  "qk_head_dim",
  "num_nextn_predict_layers",
  "rope_parameters",
  "rope_scaling",
}


def to_hf_tensors(params: dict, model_cfg):
  """moejax params -> {HF tensor name: numpy array} (DeepSeek-V2's table)."""
  require_exportable(model_cfg)
  return hf_mapping.to_hf_tensors(params, tensor_maps(model_cfg), "DeepSeek-V3")


def from_hf_tensors(tensors, abstract_params, model_cfg):
  """{HF tensor name: array} -> moejax params (fused expert layout accepted)."""
  return hf_deepseek.from_hf_tensors(tensors, abstract_params, model_cfg)
