"""The HF DeepSeek-V3 family against transformers' DeepseekV3ForCausalLM: a random tiny
transformers model (non-zero e_score_correction_bias, group-limited routing) imports with
the same logits, exports back bit-identically, and a moejax-created V3 model exports to the
same logits in transformers. Needs the `interop` extra (torch CPU + transformers)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moejax.config import ModelConfig  # noqa: E402
from moejax.convert import hf  # noqa: E402
from moejax.convert.safetensors_io import ConversionError  # noqa: E402
from tests.helpers import assert_same_safetensors, init_model_params, random_like  # noqa: E402
from tests.test_convert import logits_of  # noqa: E402

HF_CONFIG = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  moe_intermediate_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  num_key_value_heads=2,
  q_lora_rank=None,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=4,
  v_head_dim=8,
  n_routed_experts=8,
  n_shared_experts=1,
  num_experts_per_tok=2,
  n_group=4,
  topk_group=2,
  first_k_dense_replace=1,
  norm_topk_prob=True,
  routed_scaling_factor=2.5,
  max_position_embeddings=64,
  rope_interleave=True,
  rms_norm_eps=1e-6,
)


def save_random_hf(path: str, seed: int = 0, **changes) -> None:
  torch.manual_seed(seed)
  config = transformers.DeepseekV3Config(**{**HF_CONFIG, **changes})
  model = transformers.DeepseekV3ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "gate.weight" in name else 0.1))
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.05 * torch.randn_like(b))  # large enough to change some selections
  model.save_pretrained(path)


def hf_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  assert type(model).__name__ == "DeepseekV3ForCausalLM"
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens_for(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 64, (2, 16)).astype(np.int32)


@pytest.mark.slow  # ~1 min of compiles under load; the router itself is tested in test_deepseek_v3
def test_transformers_v3_imports_with_equal_logits_and_exports_bit_identically(tmp_path):
  save_random_hf(str(tmp_path / "hf"))
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  assert cfg.moe.router == "deepseek_v3" and (cfg.moe.n_group, cfg.moe.topk_group) == (4, 2)
  assert np.any(params["layers_1"]["ffn"]["router_bias"] != 0)
  tokens = tokens_for(1)
  np.testing.assert_allclose(
    logits_of(cfg, params, tokens), hf_logits(str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )
  hf.export_hf(params, cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")


@pytest.mark.slow
def test_moejax_v3_exports_to_equal_logits_in_transformers(tmp_path):
  save_random_hf(str(tmp_path / "src"), q_lora_rank=12)
  section, _ = hf.import_hf(str(tmp_path / "src"))
  cfg = ModelConfig.from_config(section)
  params = random_like(init_model_params(cfg), seed=4, router_scale=3.0)
  hf.export_hf(params, cfg, str(tmp_path / "hf"))
  tokens = tokens_for(2)
  np.testing.assert_allclose(
    logits_of(cfg, params, tokens), hf_logits(str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(rope_interleave=False), "rope_interleave=False"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
  ],
)
def test_unsupported_v3_options_are_rejected_by_name(tmp_path, changes, match):
  save_random_hf(str(tmp_path / "hf"), **changes)
  with pytest.raises(ConversionError, match=match):
    hf.import_hf(str(tmp_path / "hf"))


@pytest.mark.slow
def test_transformers_v2_group_limited_greedy_imports_with_equal_logits(tmp_path):
  """DeepSeek-V2 ``topk_method='group_limited_greedy'`` -> moejax shared_experts + n_group."""
  torch.manual_seed(3)
  keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size")
  keys += ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "kv_lora_rank")
  keys += ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
  keys += ("n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "rms_norm_eps")
  config = transformers.DeepseekV2Config(
    **{k: HF_CONFIG[k] for k in keys},
    q_lora_rank=None,
    topk_method="group_limited_greedy",
    n_group=4,
    topk_group=1,
    max_position_embeddings=64,
  )
  model = transformers.DeepseekV2ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "gate.weight" in name else 0.1))
  model.save_pretrained(str(tmp_path / "hf"))
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  assert (cfg.moe.router, cfg.moe.n_group, cfg.moe.topk_group) == ("shared_experts", 4, 1)
  tokens = tokens_for(3)
  got = logits_of(cfg, params, tokens)
  np.testing.assert_allclose(got, hf_logits_any(str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4)


def hf_logits_any(model_dir: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
