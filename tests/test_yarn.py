"""YaRN RoPE (Peng et al., 2023) for MLA: frequencies, cos/sin and the softmax scale equal a
float64 NumPy reference of the paper's NTK-by-parts ramp as transformers' DeepSeek-V2/V3
compute it; a transformers DeepSeek-V2 model with YaRN imports with the same logits and
exports back bit-identically; config errors name the field."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.convert import hf, hf_deepseek
from moejax.convert.safetensors_io import ConversionError
from moejax.errors import ConfigError
from moejax.fields import as_dict
from moejax.models.rope import yarn_inv_freq, yarn_rope_angles
from moejax.models.transformer import mla_rope_angles, mla_softmax_scale
from tests.helpers import assert_same_safetensors
from tests.test_mla import model_cfg

YARN = dict(
  rope_scaling="yarn",
  rope_factor=40.0,
  rope_original_max_len=4096,
  rope_beta_fast=32.0,
  rope_beta_slow=1.0,
  rope_mscale=0.707,
  rope_mscale_all_dim=0.707,
)


def ref_inv_freq(dim, theta, s, orig, beta_fast, beta_slow) -> np.ndarray:
  """float64: pair i makes r_i = orig * theta^(-2i/dim) / (2 pi) rotations over the original
  context; the ramp runs between the (floored / ceiled) pair indices making beta_fast and
  beta_slow rotations; below it the frequency is kept, above it divided by s."""
  i = np.arange(dim // 2, dtype=np.float64)
  inv_freq = theta ** (-2 * i / dim)

  def index_of(rotations):  # solve orig * theta^(-2i/dim) / (2 pi) = rotations for i
    return dim / 2 * math.log(orig / (2 * math.pi * rotations)) / math.log(theta)

  low, high = max(math.floor(index_of(beta_fast)), 0), min(math.ceil(index_of(beta_slow)), dim - 1)
  ramp = np.clip((i - low) / max(high - low, 1e-3), 0, 1)  # 0: keep, 1: interpolate
  return inv_freq * (1 - ramp) + inv_freq / s * ramp


def ref_mscale(s, m):
  return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1


@pytest.mark.parametrize(
  "dim,theta,s,orig,fast,slow,m,m_all",
  [
    (64, 1e4, 40.0, 4096, 32.0, 1.0, 0.707, 0.707),  # DeepSeek-V2
    (64, 1e4, 40.0, 4096, 32.0, 1.0, 1.0, 1.0),  # DeepSeek-V3
    (16, 500.0, 4.0, 64, 8.0, 2.0, 0.0, 0.5),  # attention factor from s alone
    (8, 2000.0, 2.0, 32, 16.0, 1.0, 1.0, 0.0),  # no softmax multiplier
  ],
)
def test_frequencies_cos_sin_and_softmax_scale_match_the_reference(
  dim, theta, s, orig, fast, slow, m, m_all
):
  ours = np.asarray(yarn_inv_freq(dim, theta, s, orig, fast, slow))
  ref = ref_inv_freq(dim, theta, s, orig, fast, slow)
  np.testing.assert_allclose(ours, ref, rtol=2e-6)
  # the paper's property: fast pairs (> beta_fast rotations over orig) keep their frequency,
  # slow pairs (< beta_slow rotations) are interpolated by 1/s
  rotations = orig * theta ** (-np.arange(0, dim, 2) / dim) / (2 * math.pi)
  base = theta ** (-np.arange(0, dim, 2) / dim)
  keep, squeeze = rotations > fast * 1.5, rotations < slow / 1.5
  np.testing.assert_allclose(ours[keep], base[keep], rtol=2e-6)
  np.testing.assert_allclose(ours[squeeze], base[squeeze] / s, rtol=2e-6)
  assert keep.any() or squeeze.any()

  cfg = model_cfg(
    qk_rope_head_dim=dim,
    rope_theta=theta,
    rope_scaling="yarn",
    rope_factor=s,
    rope_original_max_len=orig,
    rope_beta_fast=fast,
    rope_beta_slow=slow,
    rope_mscale=m,
    rope_mscale_all_dim=m_all,
  )
  positions = jnp.array([0, 1, 7, 100, 3000])
  cos, sin = mla_rope_angles(positions, cfg)
  factor = ref_mscale(s, m) / ref_mscale(s, m_all) if m and m_all else ref_mscale(s, 1)
  angles = np.asarray(positions, np.float64)[:, None] * ref
  np.testing.assert_allclose(np.asarray(cos), np.cos(angles) * factor, atol=2e-3)
  np.testing.assert_allclose(np.asarray(sin), np.sin(angles) * factor, atol=2e-3)
  small = positions[:3]  # float32 angles are exact enough at small positions
  cos_s, sin_s = mla_rope_angles(small, cfg)
  np.testing.assert_allclose(np.asarray(cos_s), np.cos(angles[:3]) * factor, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin_s), np.sin(angles[:3]) * factor, atol=1e-5)
  mult = ref_mscale(s, m_all) ** 2 if m_all else 1.0
  expected = (cfg.qk_nope_head_dim + dim) ** -0.5 * mult
  assert mla_softmax_scale(cfg) == pytest.approx(expected, rel=1e-12)


def test_matches_transformers_compute_yarn_parameters():
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0}
  rope.update(original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
  rope.update(mscale=0.707, mscale_all_dim=0.707)
  config = transformers.DeepseekV2Config(
    hidden_size=32,
    num_attention_heads=4,
    qk_rope_head_dim=64,
    max_position_embeddings=40 * 4096,
    rope_parameters=rope,
  )
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
  np.testing.assert_allclose(  # float32 pow may differ by an ulp between XLA and torch
    np.asarray(yarn_inv_freq(64, 1e4, 40.0, 4096, 32.0, 1.0)), inv_freq.numpy(), rtol=1e-6
  )
  cos, _ = yarn_rope_angles(jnp.array([0]), 64, 1e4, 40.0, 4096, 32.0, 1.0, 0.707, 0.707)
  np.testing.assert_allclose(np.asarray(cos), attention_factor, rtol=1e-7)


def test_yarn_with_factor_one_is_plain_rope():
  plain = model_cfg()
  unscaled = model_cfg(**{**YARN, "rope_factor": 1.0})
  positions = jnp.arange(20)
  for a, b in zip(mla_rope_angles(positions, plain), mla_rope_angles(positions, unscaled)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert mla_softmax_scale(unscaled) == mla_softmax_scale(plain)


@pytest.mark.parametrize(
  "changes,match",
  [
    (dict(rope_scaling="ntk"), r"model\.rope_scaling='ntk'.*allowed"),
    (dict(rope_factor=0.5), r"model\.rope_factor=0\.5.*>= 1"),
    (dict(rope_beta_fast=0.5), r"model\.rope_beta_fast=0\.5.*> rope_beta_slow"),
    (dict(rope_mscale=-1.0), r"model\.rope_mscale=-1\.0"),
  ],
)
def test_config_errors_name_the_field(changes, match):
  with pytest.raises(ConfigError, match=match):
    model_cfg(**{**YARN, **changes})


def test_yarn_is_mla_only():
  with pytest.raises(ConfigError, match=r"model\.rope_scaling='yarn'.*attention='mla' only"):
    ModelConfig(rope_scaling="yarn")


def test_config_json_round_trip():
  config = json.loads(json.dumps(hf_deepseek.hf_config(model_cfg(**YARN))))
  rope = config["rope_parameters"]
  assert rope == {
    "rope_type": "yarn",
    "rope_theta": 300.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
  }
  assert hf_deepseek.rope_fields_from_hf(config) == YARN
  # the transformers 4.x spelling imports the same
  scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
  legacy = dict(config, rope_parameters=None, rope_theta=300.0)
  legacy["rope_scaling"] = {**scaling, "type": "yarn"}
  assert hf_deepseek.rope_fields_from_hf(legacy) == YARN
  assert hf_deepseek.model_config_from_hf(legacy).rope_theta == 300.0


@pytest.mark.parametrize(
  "rope,match",
  [
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_type='dynamic'.*'default' or 'yarn'"),
    (
      {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "attention_factor": 1.2,
      },
      r"attention_factor=1\.2",
    ),
    ({"rope_type": "yarn", "factor": 4.0}, r"original_max_position_embeddings=None .*required"),
    (
      {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "truncate": False,
      },
      r"truncate=False",
    ),
  ],
)
def test_unsupported_rope_parameters_are_rejected_by_name(rope, match):
  with pytest.raises(ConversionError, match=match):
    hf_deepseek.rope_fields_from_hf({"rope_parameters": {"rope_theta": 1e4, **rope}})


@pytest.mark.slow
def test_transformers_yarn_model_imports_with_same_logits_and_exports_bit_identically(tmp_path):
  torch_hf = pytest.importorskip("torch"), pytest.importorskip("transformers")
  from tests.test_hf_deepseek import _save_random_hf_deepseek, hf_logits, moejax_logits, tokens_for

  rope = {"rope_type": "yarn", "rope_theta": 2000.0, "factor": 4.0}
  rope.update(original_max_position_embeddings=32, beta_fast=8, beta_slow=1)
  rope.update(mscale=0.8, mscale_all_dim=0.6)
  src = str(tmp_path / "hf")
  _save_random_hf_deepseek(torch_hf, src, seed=3, q_lora_rank=8, rope_parameters=rope)
  section, params = hf.import_hf(src)
  cfg = ModelConfig.from_config(section)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == ("yarn", 4.0, 32)
  assert (cfg.rope_mscale, cfg.rope_mscale_all_dim) == (0.8, 0.6)
  tokens = tokens_for(cfg.vocab_size, seed=4)
  ours = moejax_logits(cfg, params, tokens)
  theirs = hf_logits(torch_hf, src, tokens)
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  # YaRN changes the model: the same weights with plain RoPE give other logits
  plain = ModelConfig.from_config({**as_dict(section), "rope_scaling": "none"})
  assert np.abs(moejax_logits(plain, params, tokens) - theirs).max() > 1e-3

  hf.export_hf(params, cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")
  with open(tmp_path / "hf" / "config.json") as f, open(tmp_path / "again" / "config.json") as g:
    assert json.load(f)["rope_parameters"] == json.load(g)["rope_parameters"]


@pytest.mark.slow
def test_transformers_v3_yarn_model_imports_with_same_logits(tmp_path):
  pytest.importorskip("torch"), pytest.importorskip("transformers")
  from tests import test_hf_deepseek_v3 as v3

  rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}
  rope.update(original_max_position_embeddings=16, beta_fast=32, beta_slow=1)
  rope.update(mscale=1.0, mscale_all_dim=1.0)
  src = str(tmp_path / "hf")
  v3.save_random_hf(src, seed=5, rope_parameters=rope)
  section, params = hf.import_hf(src)
  cfg = ModelConfig.from_config(section)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_mscale_all_dim) == ("yarn", 8.0, 1.0)
  tokens = v3.tokens_for(seed=6)
  from tests.test_hf_deepseek import moejax_logits

  np.testing.assert_allclose(
    moejax_logits(cfg, params, tokens), v3.hf_logits(src, tokens), rtol=1e-4, atol=1e-4
  )
  hf.export_hf(params, cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")
  with open(tmp_path / "hf" / "config.json") as f, open(tmp_path / "again" / "config.json") as g:
    assert json.load(f)["rope_parameters"] == json.load(g)["rope_parameters"]
