"""moejax.generate / moejax.inference: KV-cached decoding equals the full forward (GQA and
MLA, left-padded batches), sharded == one device, transformers' greedy generate parity,
sampling filters, and the CLI."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.inference import SamplingConfig, generate_tokens, inference_model_config
from moejax.inference.sampling import filter_logits, sample
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.training.experiment import build_experiment
from tests.helpers import tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13]]


def small_cfg(attention: str = "gqa", **moe) -> ModelConfig:
  """One MoE layer (expert_impl='capacity': the quickest CPU compile)."""
  kw = dict(attention="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)
  moe = {"num_experts": 4, "expert_d_ff": 16, "top_k": 2, "expert_impl": "capacity", **moe}
  return ModelConfig(
    vocab_size=61,
    d_model=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_len=32,
    moe_every=1,
    first_moe_layer=0,
    moe=MoEConfig(**moe),
    **(kw if attention == "mla" else {}),
  )


def random_params(cfg: ModelConfig, seed: int):
  """Params of the model's shapes drawn in numpy (no init compile): kernels N(0, 1/fan_in)
  (router x4, clear routing margins), norm scales 1 + N(0, 0.1^2)."""
  shapes = jax.eval_shape(
    lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if leaf.ndim == 1:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    scale = 4.0 if "router" in jax.tree_util.keystr(path) else 1.0
    value = scale * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def full_forward_logits(model, params, prompts, new) -> list[np.ndarray]:
  """Per row, logits [N, V] that predicted each new token, from one uncached forward of
  prompt + new tokens (rows right-padded: causal, so padding after a row changes nothing)."""
  seqs = [list(p) + list(n[:-1]) for p, n in zip(prompts, new)]
  width = max(len(s) for s in seqs)
  batch = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, batch))
  return [logits[b, len(p) - 1 : len(s)] for b, (p, s) in enumerate(zip(prompts, seqs))]


@pytest.mark.parametrize("attention", ["gqa", pytest.param("mla", marks=pytest.mark.slow)])
def test_cached_decode_equals_the_full_forward(attention):
  cfg = small_cfg(attention, capacity_factor=1.0)  # trained with capacity; decodes dropless
  params = random_params(cfg, seed=1)
  model = Transformer(inference_model_config(cfg))
  new, logits = generate_tokens(model, params, PROMPTS, 7, return_logits=True)
  assert [len(n) for n in new] == [7, 7, 7] and logits.shape == (3, 7, 61)
  refs = full_forward_logits(model, params, PROMPTS, new)  # no cache, no left padding
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(logits[b], refs[b], rtol=1e-5, atol=1e-5)
    assert new[b] == np.argmax(refs[b], axis=-1).tolist()  # greedy
  assert len({tuple(n) for n in new}) > 1  # the rows differ: not a constant output
  if attention == "gqa":  # eos ends a row (same shapes: no new compile)
    cut = generate_tokens(model, params, PROMPTS, 7, eos_id=new[0][2], return_logits=True)[0][0]
    assert cut == new[0][: new[0].index(new[0][2]) + 1]
  with pytest.raises(ValueError, match="max_len"):
    generate_tokens(model, params, [[1] * 30], 5)


@pytest.mark.slow
def test_sharded_generation_equals_one_device():
  config = tiny_config("/unused", mesh=(2, 2, 2))
  with config.unlocked():
    config.model.num_layers, config.model.first_moe_layer = 1, 0
  exp = build_experiment(config)
  cfg = exp.model_cfg
  params = random_params(cfg, seed=2)
  one = generate_tokens(
    Transformer(inference_model_config(cfg)), params, PROMPTS, 5, return_logits=True
  )
  sharded_params = jax.device_put(params, exp.state_shardings.params)
  model = Transformer(inference_model_config(cfg, exp.mesh), mesh=exp.mesh)
  many = generate_tokens(model, sharded_params, PROMPTS, 5, return_logits=True)
  assert many[0] == one[0]
  np.testing.assert_allclose(many[1], one[1], rtol=1e-5, atol=1e-5)


def test_expert_choice_refuses_to_generate_with_a_reason():
  cfg = dataclasses.replace(
    small_cfg(), moe=MoEConfig(num_experts=4, expert_d_ff=16, router="expert_choice")
  )
  with pytest.raises(ValueError, match="expert_choice.*causal"):
    inference_model_config(cfg)


def test_top_k_and_top_p_keep_exactly_their_sets():
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  kept = lambda cfg: np.isfinite(np.asarray(filter_logits(logits, cfg)))[0].tolist()
  assert kept(SamplingConfig(1.0, top_k=2)) == [False, True, False, True, False]
  # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.85 >= 0.75 stops there
  assert kept(SamplingConfig(1.0, top_p=0.75)) == [False, True, False, True, True]
  assert kept(SamplingConfig(1.0, top_p=0.4)) == [False, True, False, False, False]
  draws = sample(jnp.tile(logits, (400, 1)), jax.random.key(0), SamplingConfig(1.0, top_k=2))
  counts = np.bincount(np.asarray(draws).ravel(), minlength=5)
  assert counts[[0, 2, 4]].sum() == 0 and 0.45 < counts[1] / 400 < 0.70  # 0.4/0.7 = 0.57
  assert int(sample(logits, jax.random.key(1), SamplingConfig())[0]) == 1  # greedy
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(1.0, top_p=0.0)


# ---------------------------------------------------------------------------- transformers


def _hf_mixtral(path):
  from tests.test_hf_interop import _save_random_hf_mixtral

  _save_random_hf_mixtral(path, seed=3)


def _hf_deepseek_v2(path):
  from tests.test_hf_deepseek import _save_random_hf_deepseek

  _save_random_hf_deepseek(
    (pytest.importorskip("torch"), pytest.importorskip("transformers")), path, seed=3
  )


def _hf_family(family):
  def save(path):
    if family == "deepseek_v3":
      from tests.test_hf_deepseek_v3 import save_random_hf

      save_random_hf(path, seed=3)
    else:
      from tests.test_hf_qwen_olmoe import save_random_hf

      save_random_hf(family, path, seed=3)

  return save


# One line per HF family: a function saving a small random transformers model to a path.
HF_FAMILIES = [
  pytest.param(_hf_mixtral, id="mixtral"),
  pytest.param(_hf_deepseek_v2, id="deepseek_v2", marks=pytest.mark.slow),
  pytest.param(_hf_family("deepseek_v3"), id="deepseek_v3", marks=pytest.mark.slow),
  pytest.param(_hf_family("qwen2_moe"), id="qwen2_moe", marks=pytest.mark.slow),
  pytest.param(_hf_family("qwen3_moe"), id="qwen3_moe", marks=pytest.mark.slow),
  pytest.param(_hf_family("olmoe"), id="olmoe", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("save_hf", HF_FAMILIES)
def test_greedy_decoding_of_an_imported_model_matches_transformers_generate(tmp_path, save_hf):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from moejax.convert import hf

  save_hf(str(tmp_path / "hf"))
  section, params = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(section)
  prompts = [[7, 3, 12, 40, 5], [9, 30, 2, 17, 44]]
  max_new = 8
  model_hf = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "hf"), dtype=torch.float32
  )
  model_hf.eval()
  with torch.no_grad():
    out = model_hf.generate(
      torch.as_tensor(prompts),
      attention_mask=torch.ones(2, 5, dtype=torch.long),
      do_sample=False,
      max_new_tokens=max_new,
      eos_token_id=None,
      pad_token_id=0,
    )
  theirs = out[:, 5:].numpy().tolist()
  assert all(len(t) == max_new for t in theirs)
  ours = generate_tokens(Transformer(inference_model_config(cfg)), params, prompts, max_new)
  assert ours == theirs


def random_run(data_dir, tmp_path, seed: int = 5):
  """A tiny run directory holding `random_params` at step 0: (workdir, model cfg, params)."""
  from moejax.training.workdir import write_run

  config = tiny_config(data_dir, mesh=(-1, 1, 1))
  cfg = build_experiment(config).model_cfg
  params = random_params(cfg, seed=seed)
  workdir = str(tmp_path / "run")
  write_run(config, workdir, params)
  return workdir, cfg, params


@pytest.mark.slow
def test_generate_cli_prints_the_greedy_continuation(data_dir, tmp_path, capsys):
  from moejax.generate import main as generate_main

  workdir, cfg, params = random_run(data_dir, tmp_path)
  capsys.readouterr()  # TFDS's preparation messages
  argv = ["--workdir", workdir, "--max_new_tokens", "6"]
  assert generate_main(argv + ["--prompt_ids", "1,72,101", "--prompt_ids", "1,99"]) == 0
  printed = [[int(t) for t in line.split(",")] for line in capsys.readouterr().out.split()]
  model = Transformer(inference_model_config(cfg))
  refs = full_forward_logits(model, params, [[1, 72, 101], [1, 99]], printed)
  for row, ref in zip(printed, refs):
    assert row == np.argmax(ref, axis=-1)[: len(row)].tolist()  # cut after eos (id 2)
  assert generate_main(argv + ["--prompt", "the cat", "--one_device", "--json"]) == 0
  assert '"prompt": "the cat"' in capsys.readouterr().out
  assert generate_main(argv + ["--prompt", "x", "--top_p", "0"]) == 2
