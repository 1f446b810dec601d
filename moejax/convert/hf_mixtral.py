"""moejax <-> Hugging Face Mixtral: tensor names, layouts and config.json.

Tensor correspondence (torch ``nn.Linear`` stores ``weight`` as [out, in]; moejax kernels
are [in, ..., out]). i = layer, j = expert:

  moejax param                        HF Mixtral tensor                               map
  embed/embedding          [V, d]     model.embed_tokens.weight           [V, d]       =
  layers_i/attn_norm/scale [d]        model.layers.i.input_layernorm.weight [d]        =
  layers_i/attn/q/kernel   [d, H, Dh] ...self_attn.q_proj.weight          [H*Dh, d]    T, reshape
  layers_i/attn/k/kernel   [d, Hkv, Dh] ...self_attn.k_proj.weight        [Hkv*Dh, d]  T, reshape
  layers_i/attn/v/kernel   [d, Hkv, Dh] ...self_attn.v_proj.weight        [Hkv*Dh, d]  T, reshape
  layers_i/attn/o/kernel   [H, Dh, d] ...self_attn.o_proj.weight          [d, H*Dh]    T, reshape
  layers_i/ffn_norm/scale  [d]        ...post_attention_layernorm.weight  [d]          =
  layers_i/ffn/router      [d, E]     ...block_sparse_moe.gate.weight     [E, d]       T
  layers_i/ffn/wi_gate     [E, d, f]  ...block_sparse_moe.experts.j.w1.weight [f, d]   [j].T
  layers_i/ffn/wi_up       [E, d, f]  ...block_sparse_moe.experts.j.w3.weight [f, d]   [j].T
  layers_i/ffn/wo          [E, f, d]  ...block_sparse_moe.experts.j.w2.weight [d, f]   [j].T
  final_norm/scale         [d]        model.norm.weight                   [d]          =
  lm_head/kernel           [d, V]     lm_head.weight                      [V, d]       T

(``...`` = ``model.layers.i.``.) q_proj.weight's row h*Dh + k is head h, dim k, so
q/kernel = q_proj.weight.T.reshape(d, H, Dh) and o/kernel = o_proj.weight.T.reshape(H, Dh, d).
The router is ``block_sparse_moe.gate`` in transformers 4.x and ``mlp.gate`` in 5.x.

The per-expert ``w1/w2/w3`` names are what ``MixtralForCausalLM.save_pretrained`` writes
and loads. transformers >= 5 fuses them in memory to ``mlp.experts.gate_up_proj`` [E, 2f, d]
(rows :f are w1, f: are w3) and ``mlp.experts.down_proj`` [E, d, f] (= w2), i.e.
wi_gate = gate_up_proj[:, :f].mT, wi_up = gate_up_proj[:, f:].mT, wo = down_proj.mT; that
fused layout is accepted on import too. Every map is a pure reshape/transpose,
so export -> import is bit-exact.

Architecture equivalence: moejax's Transformer with moe_every=1, router='topk',
router_order='topk_softmax' (softmax over the selected logits == HF's softmax -> top-k ->
renormalise), dropless=True and activation='silu' computes the function HF Mixtral does.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import ml_collections
import numpy as np
from flax import traverse_util

from moejax.convert.safetensors_io import ConversionError

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"

Array = np.ndarray


def _linear(kernel: Array) -> Array:
  """moejax kernel [in, *out] -> torch Linear weight [prod(out), in]."""
  return kernel.reshape(kernel.shape[0], -1).T


def _out_linear(kernel: Array) -> Array:
  """moejax kernel [*in, out] -> torch Linear weight [out, prod(in)]."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def require_exportable(model_cfg) -> None:
  """Raises ConversionError naming the config field that HF Mixtral cannot express."""
  moe = model_cfg.moe
  problems = []
  if getattr(model_cfg, "attention", "gqa") != "gqa":
    problems.append(f"model.attention={model_cfg.attention!r} must be 'gqa'")
  if moe is None or model_cfg.moe_every != 1 or model_cfg.first_moe_layer != 0:
    problems.append("every layer must be MoE (model.moe_every=1, model.first_moe_layer=0)")
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


def model_section_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """The ``model`` config section (ConfigDict) equivalent to an HF Mixtral config.json."""
  if hf.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"config.json model_type={hf.get('model_type')!r} is not supported "
      f"by the Mixtral converter (expected {MODEL_TYPE!r})"
    )
  rope = hf.get("rope_parameters") or {}
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  model = ml_collections.ConfigDict()
  model.vocab_size = hf["vocab_size"]
  model.d_model = hf["hidden_size"]
  model.num_layers = hf["num_hidden_layers"]
  model.num_heads = heads
  model.num_kv_heads = hf.get("num_key_value_heads") or heads
  model.head_dim = head_dim
  model.d_ff = hf["intermediate_size"]
  model.moe_every = 1
  model.first_moe_layer = 0
  model.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6)))
  model.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-5))
  model.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  model.max_len = hf.get("max_position_embeddings", 4096)
  model.moe = ml_collections.ConfigDict(
    dict(
      num_experts=hf["num_local_experts"],
      expert_d_ff=hf["intermediate_size"],
      router="topk",
      top_k=hf["num_experts_per_tok"],
      router_order="topk_softmax",
      dropless=True,
      activation="silu",
      load_balance_weight=float(hf.get("router_aux_loss_coef", 0.01)),
    )
  )
  return model


def _layer_maps(i: int, num_experts: int):
  """(moejax path, HF name, to_hf, from_hf(tensor, like)) for layer i's tensors."""
  hf = f"model.layers.{i}"
  ml = f"layers_{i}"
  maps = [
    (f"{ml}/attn_norm/scale", f"{hf}.input_layernorm.weight", None, None),
    (f"{ml}/ffn_norm/scale", f"{hf}.post_attention_layernorm.weight", None, None),
    (f"{ml}/ffn/router", f"{hf}.block_sparse_moe.gate.weight", np.transpose, None),
  ]
  for name in ("q", "k", "v"):
    maps.append(
      (
        f"{ml}/attn/{name}/kernel",
        f"{hf}.self_attn.{name}_proj.weight",
        _linear,
        lambda t, like: t.T.reshape(like.shape),
      )
    )
  maps.append(
    (
      f"{ml}/attn/o/kernel",
      f"{hf}.self_attn.o_proj.weight",
      _out_linear,
      lambda t, like: t.T.reshape(like.shape),
    )
  )
  for j in range(num_experts):
    for param, w in (("wi_gate", "w1"), ("wi_up", "w3"), ("wo", "w2")):
      maps.append(
        (
          f"{ml}/ffn/{param}",
          f"{hf}.block_sparse_moe.experts.{j}.{w}.weight",
          _expert_to_hf(j),
          None,
        )
      )
  return maps


def _expert_to_hf(j: int) -> Callable[[Array], Array]:
  return lambda stacked: stacked[j].T


def _flatten(params) -> dict[str, Any]:
  """{'layers_0/attn/q/kernel': leaf} for a nested dict (or FrozenDict) of leaves."""
  return traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _global_maps(model_cfg):
  maps = [
    ("embed/embedding", "model.embed_tokens.weight", None, None),
    ("final_norm/scale", "model.norm.weight", None, None),
  ]
  if not model_cfg.tie_embeddings:
    maps.append(("lm_head/kernel", "lm_head.weight", np.transpose, None))
  return maps


def to_hf_tensors(params: dict, model_cfg) -> dict[str, Array]:
  """moejax params (nested dict of arrays) -> {HF tensor name: numpy array}."""
  require_exportable(model_cfg)
  flat = _flatten(params)
  tensors = {}
  maps = _global_maps(model_cfg)
  for i in range(model_cfg.num_layers):
    maps += _layer_maps(i, model_cfg.moe.num_experts)
  for path, name, to_hf, _ in maps:
    if path not in flat:
      raise ConversionError(f"moejax parameter {path} is missing from the checkpoint")
    value = flat[path]
    value = np.asarray(value)
    tensors[name] = np.ascontiguousarray(to_hf(value) if to_hf else value)
  unused = set(flat) - {m[0] for m in maps}
  if unused:
    raise ConversionError(f"moejax parameters with no Mixtral counterpart: {sorted(unused)}")
  return tensors


def _defuse(tensors: dict[str, Array]) -> dict[str, Array]:
  """transformers>=5 in-memory layout (mlp.experts.gate_up_proj [E, 2f, d], down_proj
  [E, d, f], mlp.gate.weight) -> the per-expert names of the file format."""
  out = {}
  for name, t in tensors.items():
    m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(.*)", name)
    if not m:
      out[name] = t
      continue
    layer, rest = m.groups()
    if rest == "experts.gate_up_proj":
      f = t.shape[1] // 2
      for j in range(t.shape[0]):
        out[f"{layer}.block_sparse_moe.experts.{j}.w1.weight"] = t[j, :f]
        out[f"{layer}.block_sparse_moe.experts.{j}.w3.weight"] = t[j, f:]
    elif rest == "experts.down_proj":
      for j in range(t.shape[0]):
        out[f"{layer}.block_sparse_moe.experts.{j}.w2.weight"] = t[j]
    else:
      out[f"{layer}.block_sparse_moe.{rest}"] = t
  return out


def from_hf_tensors(tensors: dict[str, Array], abstract_params: dict, model_cfg) -> dict:
  """{HF tensor name: array} -> moejax params shaped like `abstract_params`.

  `abstract_params`: a tree of arrays or ShapeDtypeStructs giving every expected shape
  (e.g. ``jax.eval_shape(model.init, ...)``). Raises ConversionError naming a missing
  tensor, or a tensor and both shapes on a mismatch.
  """
  tensors = _defuse(tensors)
  like = _flatten(abstract_params)
  maps = _global_maps(model_cfg)
  for i in range(model_cfg.num_layers):
    maps += _layer_maps(i, model_cfg.moe.num_experts)
  flat: dict[str, Array] = {}
  expert_parts: dict[str, list] = {}
  for path, name, to_hf, from_hf in maps:
    if name not in tensors:
      raise ConversionError(f"tensor {name} (for moejax {path}) is missing from the HF checkpoint")
    target = like[path]
    t = tensors[name]
    if path.endswith(("/wi_gate", "/wi_up", "/wo")):
      expected = tuple(target.shape[1:][::-1])
      _check_shape(name, t.shape, expected)
      expert_parts.setdefault(path, []).append(t.T)
      continue
    expected = _hf_shape(path, target.shape, to_hf)
    _check_shape(name, t.shape, expected)
    flat[path] = from_hf(t, target) if from_hf else (t.T if to_hf is np.transpose else t)
  for path, parts in expert_parts.items():
    flat[path] = np.stack(parts)
  for path, target in like.items():
    if path not in flat:
      raise ConversionError(f"no HF tensor maps to moejax parameter {path}")
    flat[path] = flat[path].astype(target.dtype, copy=False)
  return traverse_util.unflatten_dict(flat, sep="/")


def _hf_shape(path: str, shape: tuple, to_hf) -> tuple:
  if to_hf is None:
    return tuple(shape)
  if to_hf is np.transpose:
    return tuple(shape[::-1])
  if path.endswith("attn/o/kernel"):
    return (shape[-1], int(np.prod(shape[:-1])))
  return (int(np.prod(shape[1:])), shape[0])


def _check_shape(name: str, got: tuple, expected: tuple) -> None:
  if tuple(got) != tuple(expected):
    raise ConversionError(
      f"tensor {name} has shape {tuple(got)} but the moejax config expects {tuple(expected)}"
    )
