"""moejax <-> Hugging Face DeepSeek-V2 (``deepseek_v2``): tensor table and config.json.

transformers' ``DeepseekV2ForCausalLM`` (DeepSeek-AI, 2024): MLA, the first
``first_k_dense_replace`` layers dense, then DeepSeekMoE (softmax -> greedy or group-limited
top-k, not renormalised, times ``routed_scaling_factor``, plus shared experts) is moejax
attention='mla', router='shared_experts', router_order='softmax_topk', dropless. ``TABLE``
maps every tensor by reshape/transpose (import -> export is bit-exact); RoPE default or YaRN.
"""

from __future__ import annotations

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
from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "DeepseekV2ForCausalLM"
MODEL_TYPE = "deepseek_v2"
DEFAULT_AUX_LOSS_ALPHA = 0.001  # DeepSeek-V2-Lite's expert-level balance factor

Array = np.ndarray


# ----------------------------------------------------------------------------- table

_MLA = "layers_{i}/attn"
_SA = "model.layers.{i}.self_attn"
_FFN = (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))
_q_lora = lambda cfg: bool(cfg.q_lora_rank)

TABLE = (
  *DECODER_ROWS,
  Row(f"{_MLA}/q_a/kernel", f"{_SA}.q_a_proj.weight", TRANSPOSE, when=_q_lora),
  Row(f"{_MLA}/q_norm/scale", f"{_SA}.q_a_layernorm.weight", when=_q_lora),
  Row(f"{_MLA}/q_b/kernel", f"{_SA}.q_b_proj.weight", LINEAR_IN, when=_q_lora),
  Row(f"{_MLA}/q/kernel", f"{_SA}.q_proj.weight", LINEAR_IN, when=lambda c: not _q_lora(c)),
  Row(f"{_MLA}/kv_a/kernel", f"{_SA}.kv_a_proj_with_mqa.weight", TRANSPOSE),
  Row(f"{_MLA}/kv_norm/scale", f"{_SA}.kv_a_layernorm.weight"),
  Row(f"{_MLA}/kv_b/kernel", f"{_SA}.kv_b_proj.weight", LINEAR_IN),
  Row(f"{_MLA}/o/kernel", f"{_SA}.o_proj.weight", LINEAR_OUT),
  *(
    Row(f"layers_{{i}}/ffn/{p}", f"model.layers.{{i}}.mlp.{w}.weight", TRANSPOSE, "dense")
    for p, w in _FFN
  ),
  Row("layers_{i}/ffn/router", "model.layers.{i}.mlp.gate.weight", TRANSPOSE, "moe"),
  Row(
    "layers_{i}/ffn/router_bias",
    "model.layers.{i}.mlp.gate.e_score_correction_bias",
    scope="moe",
    when=lambda cfg: cfg.moe.router == "deepseek_v3",
  ),
  *(
    Row(
      f"layers_{{i}}/ffn/shared/{p}",
      f"model.layers.{{i}}.mlp.shared_experts.{w}.weight",
      TRANSPOSE,
      "moe",
    )
    for p, w in _FFN
  ),
  *(
    Row(
      f"layers_{{i}}/ffn/{p}",
      f"model.layers.{{i}}.mlp.experts.{{j}}.{w}.weight",
      TRANSPOSE,
      "expert",
    )
    for p, w in _FFN
  ),
)


def tensor_maps(cfg) -> list[TensorMap]:
  """Every (moejax param, HF tensor) pair of a model config, in a fixed order."""
  return expand(TABLE, cfg)


def _expert_names(i: int, j: int) -> tuple[str, str, str]:
  return tuple(f"model.layers.{i}.mlp.experts.{j}.{w}.weight" for _, w in _FFN)


# ----------------------------------------------------------------------------- config


def require_exportable(model_cfg) -> None:
  """Raises ConversionError naming the config fields HF DeepSeek-V2 cannot express."""
  moe = model_cfg.moe
  problems = []
  if model_cfg.attention != "mla":
    problems.append(
      f"model.attention={model_cfg.attention!r} must be 'mla' (DeepSeek-V2 "
      "uses Multi-head Latent Attention)"
    )
  if moe is None or model_cfg.moe_every != 1:
    problems.append("every layer from model.first_moe_layer on must be MoE (model.moe_every=1)")
  if moe is not None:
    if moe.router != "shared_experts":
      problems.append(f"model.moe.router={moe.router!r} must be 'shared_experts'")
    if moe.router_order != "softmax_topk":
      problems.append(
        f"model.moe.router_order={moe.router_order!r} must be 'softmax_topk' "
        "(DeepSeek-V2 does not renormalise the top-k weights)"
      )
    if moe.activation != "silu":
      problems.append(f"model.moe.activation={moe.activation!r} must be 'silu'")
    if moe.num_null_experts:
      problems.append("DeepSeek-V2 has no null experts (model.moe.num_null_experts)")
    if moe.num_compressed_experts:
      problems.append("DeepSeek-V2 has no compressed experts (model.moe.num_compressed_experts)")
    if moe.shared_expert_d_ff is not None or moe.shared_expert_gate:
      problems.append(
        "model.moe.shared_expert_d_ff must be None and shared_expert_gate False (DeepSeek's "
        "shared experts are num_shared_experts * expert_d_ff wide, ungated)"
      )
  if problems:
    raise ConversionError("this model cannot be exported as HF DeepSeek-V2: " + "; ".join(problems))


def hf_config(model_cfg) -> dict[str, Any]:
  """config.json contents for a moejax ModelConfig (after `require_exportable`)."""
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
    "num_key_value_heads": m.num_heads,
    "q_lora_rank": m.q_lora_rank or None,
    "kv_lora_rank": m.kv_lora_rank,
    "qk_nope_head_dim": m.qk_nope_head_dim,
    "qk_rope_head_dim": m.qk_rope_head_dim,
    "v_head_dim": m.v_head_dim,
    "head_dim": m.qk_rope_head_dim,  # what transformers derives and writes
    "n_routed_experts": moe.num_experts,
    "n_shared_experts": moe.num_shared_experts,
    "num_experts_per_tok": moe.top_k,
    "first_k_dense_replace": m.first_moe_layer,
    "moe_layer_freq": 1,
    "routed_scaling_factor": float(moe.routed_scaling_factor),
    "topk_method": "group_limited_greedy" if moe.n_group > 1 else "greedy",
    "n_group": moe.n_group if moe.n_group > 1 else None,
    "topk_group": moe.topk_group if moe.n_group > 1 else None,
    "norm_topk_prob": False,
    "aux_loss_alpha": moe.load_balance_weight,
    "hidden_act": "silu",
    "rms_norm_eps": m.rms_norm_eps,
    "rope_theta": m.rope_theta,
    "rope_parameters": hf_rope_parameters(m),
    "max_position_embeddings": m.max_len,
    "tie_word_embeddings": m.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "output_router_logits": False,
    "torch_dtype": str(m.param_dtype),
    "dtype": str(m.param_dtype),
    "bos_token_id": 1,
    "eos_token_id": 2,
  }


def _rope_type(hf: dict[str, Any]) -> tuple[str, float]:
  """(rope_type, rope_theta) from transformers 5 ``rope_parameters`` and/or 4.x
  ``rope_theta`` + ``rope_scaling``; any non-default type among them wins."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  types = [params.get("rope_type"), scaling.get("rope_type") or scaling.get("type")]
  rope_type = next((t for t in types if t not in (None, "default")), "default")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  return rope_type, float(theta)


def hf_rope_parameters(m) -> dict[str, Any]:
  """config.json ``rope_parameters`` for a ModelConfig (transformers 5 spelling)."""
  if m.rope_scaling != "yarn":
    return {"rope_theta": m.rope_theta, "rope_type": "default"}
  params = {
    "rope_type": "yarn",
    "rope_theta": m.rope_theta,
    "factor": m.rope_factor,
    "original_max_position_embeddings": m.rope_original_max_len,
    "beta_fast": m.rope_beta_fast,
    "beta_slow": m.rope_beta_slow,
  }
  for key, value in (("mscale", m.rope_mscale), ("mscale_all_dim", m.rope_mscale_all_dim)):
    if value:  # 0 = absent (transformers treats a missing/0 mscale alike)
      params[key] = value
  return params


def rope_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """The model.rope_* fields of a config.json (``rope_parameters`` or 4.x ``rope_scaling``):
  {} for default RoPE, the YaRN fields for rope_type 'yarn'; anything else is rejected."""
  rope_type, _ = _rope_type(hf)
  if rope_type == "default":
    return {}
  if rope_type != "yarn":
    _reject("rope_parameters.rope_type", rope_type, "only 'default' or 'yarn' RoPE")
  params = hf.get("rope_parameters") or {}
  if (params.get("rope_type") or params.get("type")) != "yarn":
    params = hf.get("rope_scaling") or {}
  if params.get("attention_factor") is not None:
    _reject(
      "rope_parameters.attention_factor",
      params["attention_factor"],
      "YaRN's attention factor must be derived from factor/mscale/mscale_all_dim",
    )
  if params.get("truncate", True) is not True:
    _reject("rope_parameters.truncate", params["truncate"], "true (the paper's rounding)")
  for key in ("factor", "original_max_position_embeddings"):
    if params.get(key) is None:
      _reject(f"rope_parameters.{key}", params.get(key), "required for YaRN")
  return dict(
    rope_scaling="yarn",
    rope_factor=float(params["factor"]),
    rope_original_max_len=int(params["original_max_position_embeddings"]),
    rope_beta_fast=float(params.get("beta_fast") or 32),
    rope_beta_slow=float(params.get("beta_slow") or 1),
    rope_mscale=float(params.get("mscale") or 0),
    rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0),
  )


def _reject(field: str, value, allowed: str) -> None:
  raise ConversionError(
    f"config.json {field}={value!r} is not supported by the DeepSeek-V2 converter: {allowed}"
  )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The validated ModelConfig equivalent to an HF DeepSeek-V2 config.json."""
  return ModelConfig.from_config(model_dict_from_hf(hf), path="model")


def model_dict_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """The ``model`` section (a plain dict, unvalidated) of ``model_config_from_hf``; every
  unsupported option is a ConversionError naming it."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"config.json model_type={hf.get('model_type')!r} is not supported "
      f"by the DeepSeek-V2 converter (expected {MODEL_TYPE!r})"
    )
  _, theta = _rope_type(hf)
  rope_fields = rope_fields_from_hf(hf)
  checks = [
    ("norm_topk_prob", False, "the top-k weights must not be renormalised"),
    ("moe_layer_freq", 1, "every layer from first_k_dense_replace on must be MoE"),
    ("attention_bias", False, "no attention biases"),
    ("mlp_bias", False, "no MLP biases"),
    ("hidden_act", "silu", "SiLU (SwiGLU) only"),
  ]
  for field, allowed, why in checks:
    value = hf.get(field, allowed)
    if value != allowed:
      _reject(field, value, f"{why} ({allowed!r})")
  topk_method = hf.get("topk_method", "greedy")
  if topk_method not in ("greedy", "group_limited_greedy"):
    _reject("topk_method", topk_method, "'greedy' or 'group_limited_greedy'")
  grouped = topk_method == "group_limited_greedy"
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads") not in (None, heads):
    _reject(
      "num_key_value_heads",
      hf["num_key_value_heads"],
      f"MLA needs num_key_value_heads = num_attention_heads = {heads}",
    )
  if not hf.get("n_shared_experts"):
    _reject("n_shared_experts", hf.get("n_shared_experts"), "at least one shared expert")
  layers, first_moe = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
  if not (hf.get("n_routed_experts") and first_moe < layers):
    _reject(
      "first_k_dense_replace",
      first_moe,
      f"at least one MoE layer (n_routed_experts={hf.get('n_routed_experts')!r}, "
      f"num_hidden_layers={layers})",
    )

  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=heads,  # unused by MLA
    head_dim=hf["qk_rope_head_dim"],  # unused by MLA; transformers' head_dim
    attention="mla",
    q_lora_rank=hf.get("q_lora_rank") or 0,
    kv_lora_rank=hf["kv_lora_rank"],
    qk_nope_head_dim=hf["qk_nope_head_dim"],
    qk_rope_head_dim=hf["qk_rope_head_dim"],
    v_head_dim=hf["v_head_dim"],
    d_ff=hf["intermediate_size"],
    moe_every=1,
    first_moe_layer=first_moe,
    rope_theta=theta,
    **rope_fields,
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_len=hf.get("max_position_embeddings", 4096),
    moe=dict(
      num_experts=hf["n_routed_experts"],
      expert_d_ff=hf["moe_intermediate_size"],
      router="shared_experts",
      num_shared_experts=hf["n_shared_experts"],
      top_k=hf["num_experts_per_tok"],
      router_order="softmax_topk",
      dropless=True,
      activation="silu",
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      load_balance_weight=float(hf.get("aux_loss_alpha", DEFAULT_AUX_LOSS_ALPHA)),
      n_group=(hf.get("n_group") or 1) if grouped else 1,
      topk_group=(hf.get("topk_group") or 1) if grouped else 1,
    ),
  )


# ----------------------------------------------------------------------------- tensors


def to_hf_tensors(params: dict, model_cfg) -> dict[str, Array]:
  """moejax params (nested dict of arrays) -> {HF tensor name: numpy array}."""
  require_exportable(model_cfg)
  return mapping.to_hf_tensors(params, tensor_maps(model_cfg), "DeepSeek")


def from_hf_tensors(tensors: dict[str, Array], abstract_params: dict, model_cfg) -> dict:
  """{HF tensor name: array} -> moejax params shaped like `abstract_params`
  (``moejax.convert.hf_mapping.from_hf_tensors``); the fused expert layout is accepted."""
  tensors = mapping.defuse(tensors, _expert_names)
  return mapping.from_hf_tensors(tensors, abstract_params, tensor_maps(model_cfg))
