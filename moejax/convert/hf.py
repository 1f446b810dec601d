"""Export to / import from Hugging Face ``transformers`` checkpoint directories.

A directory holds ``config.json`` + safetensors (sharded with an index above
`max_shard_bytes`), loadable with ``transformers.AutoModelForCausalLM.from_pretrained``.
Families (one module each, same interface), keyed by config.json ``model_type``:
'mixtral' (``moejax.convert.hf_mixtral``), 'deepseek_v2' (``moejax.convert.hf_deepseek``),
'deepseek_v3' (``moejax.convert.hf_deepseek_v3``), 'qwen3_moe' (``hf_qwen3_moe``), 'olmoe'
(``hf_olmoe``), 'qwen2_moe' (``hf_qwen2_moe``); tensor tables in ``hf_mapping`` form.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.convert import (
  hf_deepseek,
  hf_deepseek_v3,
  hf_mixtral,
  hf_olmoe,
  hf_qwen2_moe,
  hf_qwen3_moe,
)
from moejax.convert.safetensors_io import (
  ConversionError,
  atomic_directory,
  read_safetensors,
  write_safetensors,
)
from moejax.training.state import abstract_params

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {
  hf_mixtral.MODEL_TYPE: hf_mixtral,
  hf_deepseek.MODEL_TYPE: hf_deepseek,
  hf_deepseek_v3.MODEL_TYPE: hf_deepseek_v3,
  hf_qwen3_moe.MODEL_TYPE: hf_qwen3_moe,
  hf_olmoe.MODEL_TYPE: hf_olmoe,
  hf_qwen2_moe.MODEL_TYPE: hf_qwen2_moe,
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


TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
)


def inexact_differences(model_cfg: ModelConfig) -> list[str]:
  """What transformers would compute differently from this (expressible) model."""
  moe = model_cfg.moe
  diffs = []
  if moe is not None and not moe.dropless:
    diffs.append(
      "model.moe.dropless=False: this model drops tokens past each expert's capacity "
      f"(capacity_factor={moe.capacity_factor}) but transformers never drops, so its outputs "
      "differ for every token that overflowed an expert"
    )
  return diffs


def generation_config(hf_config: dict) -> dict:
  """generation_config.json: the special tokens of config.json."""
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {k: hf_config[k] for k in keys if hf_config.get(k) is not None}


def export_hf(
  params,
  model_cfg: ModelConfig,
  out_dir: str,
  family: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  dtype: str | None = None,
  overwrite: bool = False,
  allow_inexact: bool = False,
  tokenizer_dir: str | None = None,
) -> list[str]:
  """Writes `params` as an HF checkpoint directory; returns the files written.

  dtype: cast tensors to 'float32' / 'bfloat16' / 'float16' (default: keep param dtype).
  allow_inexact: export a model transformers cannot reproduce exactly (capacity dropping,
  ``inexact_differences``) with a warning saying what differs; otherwise that is an error.
  tokenizer_dir: copy the ``TOKENIZER_FILES`` found there (e.g. an imported HF directory).
  """
  module = _family_for_model(model_cfg, family)
  diffs = inexact_differences(model_cfg)
  if diffs and not allow_inexact:
    raise ConversionError(
      "transformers cannot reproduce this model: "
      + "; ".join(diffs)
      + " (pass allow_inexact=True / --allow_inexact to export anyway)"
    )
  for diff in diffs:
    log.warning("inexact HF export: %s", diff)
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
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(generation_config(config), f, indent=2, sort_keys=True)
    files += ["config.json", "generation_config.json"]
    for name in tokenizer_files(tokenizer_dir) if tokenizer_dir else []:
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
      files.append(name)
  return files


def tokenizer_files(hf_dir: str) -> list[str]:
  """The ``TOKENIZER_FILES`` present in `hf_dir`."""
  return [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{hf_dir} has no config.json; is it a Hugging Face checkpoint?")
  with open(path) as f:
    return json.load(f)


def import_hf(hf_dir: str) -> tuple[ModelConfig, dict]:
  """Reads an HF checkpoint directory -> (its validated ModelConfig, params)."""
  hf = read_hf_config(hf_dir)
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ConversionError(
      f"unknown architecture model_type={model_type!r} "
      f"(architectures={hf.get('architectures')}); supported: "
      f"{sorted(FAMILIES)}"
    )
  module = FAMILIES[model_type]
  model_cfg = module.model_config_from_hf(hf)
  abstract = abstract_params(model_cfg)
  params = module.from_hf_tensors(read_safetensors(hf_dir), abstract, model_cfg)
  return model_cfg, params
