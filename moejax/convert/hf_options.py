"""Every key of an HF config.json is implemented or rejected by name.

A family lists the keys it maps (``implemented``) and the keys it accepts only at one
value (``rules``: key -> (predicate, what is allowed)); generic ``PretrainedConfig``
bookkeeping keys (``METADATA``) never change the function. Any other key, or a ruled key
at another value, is a ConversionError naming it, so no config silently computes a
different model.
"""

from __future__ import annotations

from typing import Any, Callable

from moejax.convert.safetensors_io import ConversionError

METADATA = frozenset(
  {
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "output_router_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "problem_type",
    "router_aux_loss_coef",
    "aux_loss_alpha",
    "tokenizer_class",
    "auto_map",
    "quantization_config",
  }
)

Rule = tuple[Callable[[Any], bool], str]


def is_default_rope(hf: dict) -> bool:
  """True when neither ``rope_parameters`` (5.x) nor ``rope_scaling`` (4.x) scales RoPE."""
  for key in ("rope_parameters", "rope_scaling"):
    v = hf.get(key) or {}
    if (v.get("rope_type") or v.get("type") or "default") != "default":
      return False
  return True


def check_options(hf: dict, family: str, implemented, rules: dict[str, Rule]) -> None:
  """Raises ConversionError naming the first config.json key `family` cannot express."""
  for key, value in hf.items():
    if key in METADATA or key in implemented:
      continue
    if key not in rules:
      raise ConversionError(
        f"config.json {key}={value!r} is not implemented by the {family} converter "
        "(remove it only if it does not change the model)"
      )
    ok, allowed = rules[key]
    if not ok(value):
      raise ConversionError(
        f"config.json {key}={value!r} is not supported by the {family} converter: {allowed}"
      )
  if not is_default_rope(hf):
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    raise ConversionError(
      f"config.json rope_parameters/rope_scaling={rope!r} is not supported by the {family} "
      "converter: only default (unscaled) RoPE"
    )
