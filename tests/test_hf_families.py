"""HF conversion without transformers: the declarative tables, config options implemented
or rejected by name, inexact exports gated by a flag, generation/tokenizer files, and the
HF-exportable configs/tiny_mixtral.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import chex
import jax
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.convert import hf
from moejax.convert.safetensors_io import ConversionError
from moejax.training.state import abstract_params
from tests.helpers import load_config
from tests.test_convert import mixtral_model_cfg


def init_params(model_cfg, seed: int = 0):
  """Random numpy params of the model's shapes (no init compile: these tests only convert)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract_params(model_cfg)
  )


def _export(tmp_path, model_cfg=None, **kw):
  model_cfg = model_cfg or mixtral_model_cfg()
  out = str(tmp_path / "hf")
  files = hf.export_hf(init_params(model_cfg), model_cfg, out, **kw)
  return model_cfg, out, files


def _edit_config(hf_dir, **changes):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(sliding_window=4), "sliding_window=4 .* null"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' .* 'silu'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling.* default"),
    (
      dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
      "rope_parameters.*yarn",
    ),
    (dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (dict(some_new_option=3), "some_new_option=3 is not implemented"),
  ],
)
def test_mixtral_options_are_implemented_or_rejected_by_name(tmp_path, changes, match):
  _, out, _ = _export(tmp_path)
  _edit_config(out, **changes)
  with pytest.raises(ConversionError, match=match):
    hf.import_hf(out)


def test_capacity_dropping_export_needs_the_flag_and_warns_what_differs(tmp_path, caplog):
  model_cfg = mixtral_model_cfg()
  capacity = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, dropless=False))
  with pytest.raises(ConversionError, match="dropless=False.*allow_inexact"):
    _export(tmp_path, capacity)
  assert not os.path.exists(tmp_path / "hf")
  with caplog.at_level(logging.WARNING):
    _export(tmp_path, capacity, allow_inexact=True)
  assert "never drops" in caplog.text


def test_generation_config_and_tokenizer_files_are_written(tmp_path):
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"model": {}}')
  (tok / "tokenizer_config.json").write_text("{}")
  _, out, files = _export(tmp_path, tokenizer_dir=str(tok))
  assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2}
  assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"model": {}}'


def test_tiny_mixtral_config_exports_and_imports_bit_exactly(tmp_path):
  cfg = ModelConfig.from_config(load_config("tiny_mixtral").model)
  params = init_params(cfg)
  hf.export_hf(params, cfg, str(tmp_path / "hf"))
  section, imported = hf.import_hf(str(tmp_path / "hf"))
  assert ModelConfig.from_config(section).moe == cfg.moe
  chex.assert_trees_all_equal(imported, params)
