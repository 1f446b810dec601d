"""The HF Qwen3-MoE, OLMoE and Qwen2-MoE families against transformers: a random tiny transformers
model imports with equal logits and exports back bit-identically; a moejax model of the
family exports to equal logits in transformers. Needs the `interop` extra."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moejax.config import ModelConfig  # noqa: E402
from moejax.convert import hf  # noqa: E402
from moejax.convert.hf_qwen3_moe import moe_layout  # noqa: E402
from moejax.convert.safetensors_io import ConversionError  # noqa: E402
from tests.helpers import assert_same_safetensors, init_model_params, random_like  # noqa: E402
from tests.test_convert import logits_of  # noqa: E402

COMMON = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts=4,
  num_experts_per_tok=2,
  max_position_embeddings=64,
  rms_norm_eps=1e-6,
)
FAMILIES = {
  "qwen3_moe": (
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    dict(head_dim=8, moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=1),
  ),
  "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(norm_topk_prob=False, clip_qkv=0.4)),
  "qwen2_moe": (
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    dict(
      moe_intermediate_size=16,
      shared_expert_intermediate_size=40,
      decoder_sparse_step=2,
      num_hidden_layers=4,
      norm_topk_prob=False,
    ),
  ),
}


def save_random_hf(family: str, path: str, seed: int = 0, **changes) -> None:
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**{**COMMON, **extra, **changes})
  model = getattr(transformers, model_cls)(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "gate.weight" in name else 0.15))
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(path)


def hf_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens_for(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 64, (2, 16)).astype(np.int32)


# Each takes > 5 s (torch model + moejax compile): slow; Mixtral's round trip is the default one.
@pytest.mark.parametrize(
  "family",
  [
    pytest.param("qwen3_moe", marks=pytest.mark.slow),
    pytest.param("olmoe", marks=pytest.mark.slow),
    pytest.param("qwen2_moe", marks=pytest.mark.slow),
  ],
)
def test_transformers_model_imports_with_equal_logits_and_exports_bit_identically(tmp_path, family):
  save_random_hf(family, str(tmp_path / "hf"))
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  assert cfg.qk_norm == {"qwen3_moe": "head", "olmoe": "projection", "qwen2_moe": "none"}[family]
  tokens = tokens_for(1)
  np.testing.assert_allclose(
    logits_of(cfg, params, tokens), hf_logits(str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )
  hf.export_hf(params, cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moejax_model_exports_to_equal_logits_in_transformers(tmp_path, family):
  save_random_hf(family, str(tmp_path / "src"))
  section, _ = hf.import_hf(str(tmp_path / "src"))
  cfg = ModelConfig.from_config(section)
  params = random_like(init_model_params(cfg), seed=4, router_scale=3.0)
  hf.export_hf(params, cfg, str(tmp_path / "hf"))
  tokens = tokens_for(2)
  np.testing.assert_allclose(
    logits_of(cfg, params, tokens), hf_logits(str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )


def test_qwen3_sparse_step_and_mlp_only_layers_map_or_are_rejected():
  assert moe_layout(6, 2, []) == (1, 2)  # layers 1, 3, 5
  assert moe_layout(6, 1, [0]) == (1, 1)  # dense first layer
  with pytest.raises(ConversionError, match="mlp_only_layers=\\[3\\]"):
    moe_layout(6, 1, [3])


def test_qwen3_sliding_window_is_rejected_by_name(tmp_path):
  save_random_hf("qwen3_moe", str(tmp_path / "hf"), use_sliding_window=True, sliding_window=8)
  with pytest.raises(ConversionError, match="sliding_window=8"):
    hf.import_hf(str(tmp_path / "hf"))
