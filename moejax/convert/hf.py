"""Export to / import from Hugging Face ``transformers`` checkpoint directories.

A directory holds ``config.json`` + safetensors (sharded with an index above
`max_shard_bytes`), loadable with ``transformers.AutoModelForCausalLM.from_pretrained``.
Families (one module each, same interface), keyed by config.json ``model_type``:
'mixtral' (``moejax.convert.hf_mixtral``), 'deepseek_v2' (``moejax.convert.hf_deepseek``).
"""

from __future__ import annotations

import json
import os
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.convert import hf_deepseek, hf_mixtral
from moejax.convert.safetensors_io import (
  ConversionError,
  atomic_directory,
  read_safetensors,
  write_safetensors,
)
from moejax.training.state import abstract_params

FAMILIES: dict[str, ModuleType] = {
  hf_mixtral.MODEL_TYPE: hf_mixtral,
  hf_deepseek.MODEL_TYPE: hf_deepseek,
}


def _family_for_model(model_cfg: ModelConfig, family: str | None) -> ModuleType:
  if family is not None:
    if family not in FAMILIES:
      raise ConversionError(f"unknown HF family {family!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[family]
  errors = []
  for name, module in FAMILIES.items():
    try:
      module.require_exportable(model_cfg)
      return module
    except ConversionError as e:
      errors.append(f"{name}: {e}")
  raise ConversionError("no Hugging Face family can express this model:\n  " + "\n  ".join(errors))


def export_hf(
  params,
  model_cfg: ModelConfig,
  out_dir: str,
  family: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  dtype: str | None = None,
  overwrite: bool = False,
) -> list[str]:
  """Writes `params` as an HF checkpoint directory; returns the files written.

  dtype: cast tensors to 'float32' / 'bfloat16' / 'float16' (default: keep param dtype).
  """
  module = _family_for_model(model_cfg, family)
  tensors = module.to_hf_tensors(jax.device_get(params), model_cfg)
  if dtype is not None:
    tensors = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in tensors.items()}
  config = module.hf_config(model_cfg)
  if dtype is not None:
    config["torch_dtype"] = config["dtype"] = dtype
  with atomic_directory(out_dir, overwrite=overwrite) as tmp:
    files = write_safetensors(tensors, tmp, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    files.append("config.json")
  return files


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{hf_dir} has no config.json; is it a Hugging Face checkpoint?")
  with open(path) as f:
    return json.load(f)


def import_hf(hf_dir: str):
  """Reads an HF checkpoint directory -> (model config section (ConfigDict), params)."""
  hf = read_hf_config(hf_dir)
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ConversionError(
      f"unknown architecture model_type={model_type!r} "
      f"(architectures={hf.get('architectures')}); supported: "
      f"{sorted(FAMILIES)}"
    )
  module = FAMILIES[model_type]
  section = module.model_section_from_hf(hf)
  model_cfg = ModelConfig.from_config(section)
  abstract = abstract_params(model_cfg)
  params = module.from_hf_tensors(read_safetensors(hf_dir), abstract, model_cfg)
  return section, params
