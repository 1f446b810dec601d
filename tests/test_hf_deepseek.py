"""The HF DeepSeek-V2 family: moejax export == transformers' DeepseekV2ForCausalLM logits,
transformers save -> moejax import gives the same logits, import -> export is bit-identical,
and clear errors (unknown architecture, unsupported config, missing tensor, shape mismatch)
that never leave a partially written output directory.

The transformers tests need the `interop` extra (torch CPU + transformers); the error tests
run without it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moejax.config import ModelConfig
from moejax.convert import hf, hf_deepseek
from moejax.convert.safetensors_io import ConversionError
from moejax.models import Transformer
from tests.helpers import assert_same_safetensors, load_config
from tests.test_mla import apply, init_params, model_cfg


@pytest.fixture(scope="module")
def torch_hf():
  """(torch, transformers), or skip when the interop extra is not installed."""
  return pytest.importorskip("torch"), pytest.importorskip("transformers")


def hf_logits(torch_hf, model_dir: str, tokens: np.ndarray) -> np.ndarray:
  torch, transformers = torch_hf
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  assert type(model).__name__ == hf_deepseek.ARCHITECTURE
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens_for(vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (2, 16)).astype(np.int32)


def moejax_logits(cfg: ModelConfig, params, tokens) -> np.ndarray:
  return np.asarray(apply(cfg, params, tokens)[0])


# ---------------------------------------------------------------------------- moejax -> HF


@pytest.mark.parametrize(
  "q_lora_rank,scaling,tie",
  # (tied embeddings export by default in test_hf_interop.py)
  [(0, 1.0, False), (10, 2.5, False), pytest.param(0, 1.0, True, marks=pytest.mark.slow)],
  ids=["v2-lite", "q_lora-scaled", "tied"],
)
def test_moejax_export_gives_the_same_logits_in_transformers(
  tmp_path, torch_hf, q_lora_rank, scaling, tie
):
  cfg = model_cfg(q_lora_rank, routed_scaling_factor=scaling, tie_embeddings=tie)
  params = init_params(cfg, seed=5)
  files = hf.export_hf(params, cfg, str(tmp_path / "hf"))
  assert sorted(files) == ["config.json", "generation_config.json", "model.safetensors"]
  tokens = tokens_for(cfg.vocab_size)
  ours = moejax_logits(cfg, params, tokens)
  assert np.abs(ours).max() > 0.1  # a model that says something
  np.testing.assert_allclose(
    ours, hf_logits(torch_hf, str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )


def test_export_names_follow_the_deepseek_v2_layout():
  cfg = model_cfg(10)
  params = init_params(cfg)
  tensors = hf_deepseek.to_hf_tensors(params, cfg)
  d, h, e, f = cfg.d_model, cfg.num_heads, cfg.moe.num_experts, cfg.moe.expert_d_ff
  attn = "model.layers.1.self_attn"
  assert tensors[f"{attn}.q_a_proj.weight"].shape == (10, d)
  assert tensors[f"{attn}.q_b_proj.weight"].shape == (h * 10, 10)  # Dqk = 6 + 4
  assert tensors[f"{attn}.kv_a_proj_with_mqa.weight"].shape == (12 + 4, d)
  assert tensors[f"{attn}.kv_b_proj.weight"].shape == (h * (6 + 5), 12)
  assert tensors[f"{attn}.o_proj.weight"].shape == (d, h * 5)
  # row h * (D_n + D_v) + k of kv_b_proj is head h, dim k of moejax's kv_b kernel
  kv_b = params["layers_1"]["attn"]["kv_b"]["kernel"]
  np.testing.assert_array_equal(tensors[f"{attn}.kv_b_proj.weight"][2 * 11 + 7], kv_b[:, 2, 7])
  assert "model.layers.0.mlp.gate_proj.weight" in tensors  # layer 0 dense
  for j in range(e):
    np.testing.assert_array_equal(
      tensors[f"model.layers.2.mlp.experts.{j}.up_proj.weight"],
      params["layers_2"]["ffn"]["wi_up"][j].T,
    )
  assert tensors["model.layers.2.mlp.gate.weight"].shape == (e, d)
  assert tensors["model.layers.2.mlp.shared_experts.down_proj.weight"].shape == (d, f)
  assert len(tensors) == len(hf_deepseek.tensor_maps(cfg))
  config = hf_deepseek.hf_config(cfg)
  assert (
    config["first_k_dense_replace"],
    config["q_lora_rank"],
    config["routed_scaling_factor"],
  ) == (1, 10, 1.0)


# ---------------------------------------------------------------------------- HF -> moejax


def _save_random_hf_deepseek(torch_hf, path: str, seed: int = 0, **overrides) -> None:
  torch, transformers = torch_hf
  torch.manual_seed(seed)
  # (widths multiples of 4: transformers' grouped-mm experts need 16-byte strides)
  kw = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=36,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=12,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=6,
    n_shared_experts=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    routed_scaling_factor=1.5,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
  )
  kw.update(overrides)
  model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw))
  with torch.no_grad():  # HF's init is tiny (std 0.02) and leaves norms at 1: make it speak
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif p.ndim >= 2:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  model.save_pretrained(path)


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_transformers_model_imported_into_moejax_gives_the_same_logits(
  tmp_path, torch_hf, q_lora_rank
):
  _save_random_hf_deepseek(torch_hf, str(tmp_path / "hf"), q_lora_rank=q_lora_rank)
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  assert (cfg.attention, cfg.q_lora_rank or None, cfg.kv_lora_rank) == ("mla", q_lora_rank, 12)
  assert cfg.moe_layers == (1, 2) and cfg.moe.num_shared_experts == 2
  assert cfg.moe.routed_scaling_factor == 1.5 and cfg.rope_theta == 2000.0
  tokens = tokens_for(cfg.vocab_size, seed=1)
  ours = moejax_logits(cfg, params, tokens)
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(
    ours, hf_logits(torch_hf, str(tmp_path / "hf"), tokens), rtol=1e-4, atol=1e-4
  )


def test_import_then_export_is_bit_identical_to_the_transformers_files(tmp_path, torch_hf):
  _save_random_hf_deepseek(
    torch_hf, str(tmp_path / "hf"), seed=2, q_lora_rank=8, tie_word_embeddings=True
  )
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  assert cfg.tie_embeddings
  hf.export_hf(params, cfg, str(tmp_path / "again"))
  assert_same_safetensors(tmp_path / "hf", tmp_path / "again")
  # and the re-exported config describes the same transformers model
  with open(tmp_path / "hf" / "config.json") as f, open(tmp_path / "again" / "config.json") as g:
    a, b = json.load(f), json.load(g)
  for key in (
    "hidden_size",
    "num_hidden_layers",
    "q_lora_rank",
    "kv_lora_rank",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "routed_scaling_factor",
    "rope_parameters",
    "tie_word_embeddings",
  ):
    assert a[key] == b[key], key


def test_fused_in_memory_expert_layout_is_accepted(tmp_path, torch_hf):
  """transformers' own state_dict (experts fused into gate_up_proj / down_proj) imports to
  the same params as the files save_pretrained writes."""
  torch, transformers = torch_hf
  _save_random_hf_deepseek(torch_hf, str(tmp_path / "hf"), seed=3)
  section, params = hf.import_hf(str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "hf"), dtype=torch.float32
  )
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in state
  cfg = ModelConfig.from_config(section)
  chex.assert_trees_all_equal(hf_deepseek.from_hf_tensors(state, params, cfg), params)


# ---------------------------------------------------------------------------- errors


def test_round_trip_without_transformers_is_bit_exact(tmp_path):
  cfg = model_cfg(10, routed_scaling_factor=2.5)
  params = init_params(cfg, seed=7)
  hf.export_hf(params, cfg, str(tmp_path / "hf"))
  section, imported = hf.import_hf(str(tmp_path / "hf"))
  got = ModelConfig.from_config(section)
  # head_dim is unused by MLA (import sets it to D_r, as transformers does); all else returns
  assert got.head_dim == cfg.qk_rope_head_dim
  assert dataclasses.replace(got, head_dim=cfg.head_dim) == cfg
  chex.assert_trees_all_equal(imported, params)  # bit-exact, same structure and dtypes


def _export(tmp_path, cfg=None) -> str:
  cfg = cfg or model_cfg(0)
  hf.export_hf(init_params(cfg), cfg, str(tmp_path / "hf"))
  return str(tmp_path / "hf")


def _edit_config(path: str, **changes) -> None:
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize(
  "changes,match",
  [
    (
      dict(model_type="llama", architectures=["LlamaForCausalLM"]),
      r"unknown architecture model_type='llama' \(architectures=\['LlamaForCausalLM'\]\)",
    ),
    (
      dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 40}),
      r"rope_parameters\.rope_type='dynamic' is not supported .* only 'default' or 'yarn'",
    ),
    (
      dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 40}),
      r"rope_type='linear'",
    ),  # the transformers 4.x spelling
    (
      dict(topk_method="noaux_tc", n_group=2, topk_group=1),
      r"topk_method='noaux_tc' is not supported .* 'group_limited_greedy'",
    ),
    (dict(norm_topk_prob=True), r"norm_topk_prob=True is not supported"),
    (dict(moe_layer_freq=2), r"moe_layer_freq=2 is not supported"),
    (dict(attention_bias=True), r"attention_bias=True"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2 .* num_attention_heads = 4"),
    (dict(n_shared_experts=0), r"n_shared_experts=0 .* at least one shared expert"),
    (dict(first_k_dense_replace=3), r"first_k_dense_replace=3 .* at least one MoE layer"),
  ],
)
def test_unsupported_configs_are_rejected_by_name(tmp_path, changes, match):
  src = _export(tmp_path)
  _edit_config(src, **changes)
  with pytest.raises(ConversionError, match=match):
    hf.import_hf(src)


def test_import_errors_name_the_tensor_and_its_shapes(tmp_path):
  src = _export(tmp_path)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  missing = "model.layers.2.mlp.experts.3.down_proj.weight"
  save_file(
    {k: v for k, v in tensors.items() if k != missing}, os.path.join(src, "model.safetensors")
  )
  with pytest.raises(ConversionError, match=missing.replace(".", r"\.") + " .*missing"):
    hf.import_hf(src)
  bad = dict(tensors)
  bad["model.layers.1.self_attn.kv_b_proj.weight"] = np.zeros((44, 11), np.float32)
  save_file(bad, os.path.join(src, "model.safetensors"))
  with pytest.raises(
    ConversionError,
    match=r"kv_b_proj\.weight has shape \(44, 11\) but .* "
    r"expects \(44, 12\)",
  ):
    hf.import_hf(src)
  extra = dict(tensors)
  extra["model.layers.1.self_attn.q_a_proj.weight"] = np.zeros((8, 24), np.float32)
  save_file(extra, os.path.join(src, "model.safetensors"))
  with pytest.raises(ConversionError, match=r"no moejax counterpart .*q_a_proj"):
    hf.import_hf(src)


def test_failed_export_leaves_no_output_directory(tmp_path):
  gqa = model_cfg(0, attention="gqa")
  with pytest.raises(ConversionError, match=r"model\.attention='gqa' must be 'mla'"):
    hf.export_hf(init_params(gqa), gqa, str(tmp_path / "out"), family="deepseek_v2")
  assert not os.path.exists(tmp_path / "out")
  cfg = model_cfg(0)
  params = init_params(cfg)
  del params["layers_2"]["attn"]["kv_norm"]
  with pytest.raises(ConversionError, match=r"layers_2/attn/kv_norm/scale is missing"):
    hf.export_hf(params, cfg, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp dirs either


def test_family_is_inferred_and_models_neither_family_fits_are_rejected(tmp_path):
  topk = model_cfg(
    0, moe=dataclasses.replace(model_cfg(0).moe, router="topk", num_shared_experts=0)
  )
  with pytest.raises(
    ConversionError,
    match=r"deepseek_v2: .*model\.moe\.router='topk' must be "
    r"'shared_experts'",
  ):
    hf.export_hf(init_params(topk), topk, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  hf.export_hf(init_params(model_cfg(0)), model_cfg(0), str(tmp_path / "ok"))
  with open(tmp_path / "ok" / "config.json") as f:
    assert json.load(f)["architectures"] == [hf_deepseek.ARCHITECTURE]


def test_deepseek_like_config_is_deepseek_v2_lite_in_transformers(torch_hf):
  """configs/deepseek_like.py exports to a transformers config whose model (built on the
  meta device, nothing allocated) has exactly moejax's parameter count and names."""
  torch, transformers = torch_hf
  cfg = ModelConfig.from_config(load_config("deepseek_like").model)
  hf_cfg = hf_deepseek.hf_config(cfg)
  assert {
    k: hf_cfg[k]
    for k in (
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "q_lora_rank",
      "kv_lora_rank",
      "qk_nope_head_dim",
      "qk_rope_head_dim",
      "v_head_dim",
      "intermediate_size",
      "moe_intermediate_size",
      "n_routed_experts",
      "n_shared_experts",
      "num_experts_per_tok",
      "first_k_dense_replace",
      "vocab_size",
    )
  } == dict(
    hidden_size=2048,
    num_hidden_layers=27,
    num_attention_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    vocab_size=102400,
  )
  with torch.device("meta"):
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**hf_cfg))
  abstract = nn.meta.unbox(
    jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )
  ours = sum(x.size for x in jax.tree.leaves(abstract))
  assert sum(p.numel() for p in model.parameters()) == ours == 15_706_484_224
  # every HF tensor name of the layout exists in the transformers model (experts fused)
  hf_names = set(model.state_dict())
  for m in hf_deepseek.tensor_maps(cfg):
    name = (
      m.name
      if m.expert is None
      else m.name.rsplit(".", 3)[0] + (".down_proj" if "down_proj" in m.name else ".gate_up_proj")
    )
    assert name in hf_names, name
