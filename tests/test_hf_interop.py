"""Hugging Face interop against the real client: same logits as transformers' Mixtral.

Needs the `interop` extra (torch CPU + transformers); CI installs it.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


from moejax.config import ModelConfig  # noqa: E402
from moejax.convert import hf  # noqa: E402
from tests.helpers import assert_same_safetensors  # noqa: E402
from tests.test_convert import init_params, logits_of, mixtral_model_cfg  # noqa: E402


def hf_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens_for(vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("tie", [False, True])
def test_moejax_export_gives_the_same_logits_in_transformers(tmp_path, tie):
  model_cfg = mixtral_model_cfg(tie_embeddings=tie, rope_theta=10000.0)
  params = init_params(model_cfg, seed=11)
  hf.export_hf(params, model_cfg, str(tmp_path / "hf"))
  tokens = tokens_for(model_cfg.vocab_size)
  ours = logits_of(model_cfg, params, tokens)
  theirs = hf_logits(str(tmp_path / "hf"), tokens)
  assert np.abs(ours).max() > 0.1  # a model that says something
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _save_random_hf_mixtral(path: str, seed: int = 0, **overrides) -> None:
  torch.manual_seed(seed)
  config = transformers.MixtralConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=5000.0,
    **overrides,
  )
  model = transformers.MixtralForCausalLM(config)
  with torch.no_grad():  # HF's init leaves norms at 1: make them informative
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(path)


def test_transformers_model_imported_into_moejax_gives_the_same_logits(tmp_path):
  _save_random_hf_mixtral(str(tmp_path / "hf"))
  section, params = hf.import_hf(str(tmp_path / "hf"))
  model_cfg = ModelConfig.from_config(section)
  assert (model_cfg.d_model, model_cfg.moe.num_experts, model_cfg.num_kv_heads) == (48, 4, 2)
  assert model_cfg.rope_theta == 5000.0 and model_cfg.rms_norm_eps == 1e-6
  tokens = tokens_for(model_cfg.vocab_size, seed=1)
  np.testing.assert_allclose(
    logits_of(model_cfg, params, tokens),
    hf_logits(str(tmp_path / "hf"), tokens),
    rtol=1e-4,
    atol=1e-4,
  )


def test_import_then_export_is_bit_identical_to_the_transformers_files(tmp_path):
  _save_random_hf_mixtral(str(tmp_path / "hf"), seed=2)
  section, params = hf.import_hf(str(tmp_path / "hf"))
  model_cfg = ModelConfig.from_config(section)
  hf.export_hf(params, model_cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")


def test_sharded_export_loads_in_transformers(tmp_path):
  model_cfg = mixtral_model_cfg()
  params = init_params(model_cfg, seed=12)
  files = hf.export_hf(params, model_cfg, str(tmp_path / "hf"), max_shard_bytes=30_000)
  assert "model.safetensors.index.json" in files
  tokens = tokens_for(model_cfg.vocab_size, seed=3)
  np.testing.assert_allclose(
    logits_of(model_cfg, params, tokens),
    hf_logits(str(tmp_path / "hf"), tokens),
    rtol=1e-4,
    atol=1e-4,
  )
