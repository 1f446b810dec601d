"""SCMoE self-contrast decoding (Shi et al., 2024): the rank-k weak router, the plausibility
mask, cached contrast decoding == the formula on two full forwards (and beta = 0 ==
standard decoding), refusals, and the CLI flags."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.inference import ContrastConfig, generate_tokens, inference_model_config
from moejax.inference.contrast import contrast_logits, plausible, weak_moe_config
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.routers import route
from tests.helpers import make_moe_cfg
from tests.test_generate import PROMPTS, full_forward_logits, random_params, random_run, small_cfg


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("router", ["topk", "shared_experts"])
def test_rank_k_routes_each_token_to_its_kth_expert_only(router):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 6)).astype(np.float32)  # [G, S, E]
  order = np.argsort(-logits, axis=-1)  # descending, distinct values: no ties
  for rank in (1, 3):
    for router_order in ("topk_softmax", "softmax_topk"):
      scale = 2.5 if router == "shared_experts" else 1.0
      base = make_moe_cfg(
        router, num_experts=6, router_order=router_order, dropless=True, routed_scaling_factor=scale
      )
      weak = weak_moe_config(base, f"rank:{rank}")
      r = route(jnp.asarray(logits), weak, slots=False)
      expert = order[..., rank - 1]  # [G, S]
      gate = np.take_along_axis(_softmax(logits), expert[..., None], -1)[..., 0]
      gate = np.ones_like(gate) if router_order == "topk_softmax" else gate  # renormalised: 1
      np.testing.assert_array_equal(np.asarray(r.expert_index)[..., 0], expert)
      np.testing.assert_allclose(np.asarray(r.weight)[..., 0], scale * gate, rtol=1e-6)
      assert r.expert_index.shape == (2, 5, 1) and bool(np.all(r.valid))
  top1 = route(jnp.asarray(logits), weak_moe_config(base, "top1"), slots=False)
  np.testing.assert_array_equal(top1.expert_index[..., 0], order[..., 0])


def test_plausibility_mask_keeps_exactly_the_tokens_above_alpha_times_the_max():
  probs = np.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]])
  strong = jnp.asarray(np.log(probs) + 3.0)  # logits: any per-row shift
  kept = lambda alpha: np.asarray(plausible(strong, alpha))[0].tolist()
  assert kept(0.5) == [False, True, False, True, False]  # p >= 0.2
  assert kept(0.3) == [False, True, False, True, True]  # p >= 0.12
  assert kept(0.1) == [True, True, True, True, True]  # p >= 0.04
  assert kept(1.0) == [False, True, False, False, False]
  weak = jnp.asarray([[1.0, -2.0, 0.5, 3.0, 0.0]])
  out = np.asarray(contrast_logits(strong, weak, 0.7, 0.5))[0]
  z = 1.7 * np.asarray(strong)[0] - 0.7 * np.asarray(weak)[0]
  np.testing.assert_allclose(out[[1, 3]], z[[1, 3]], rtol=1e-6)
  assert np.all(np.isneginf(out[[0, 2, 4]]))


def _reference(strong, weak, beta, alpha):
  """The paper's formula in numpy: [N, V] logits of the strong and weak full forwards."""
  p = _softmax(strong)
  valid = p >= alpha * p.max(-1, keepdims=True)
  return np.where(valid, (1 + beta) * strong - beta * weak, -np.inf)


def test_cached_scmoe_decode_equals_the_formula_on_two_full_forwards():
  cfg = small_cfg(router_order="topk_softmax")  # Mixtral's gate; strong = top-2
  params = random_params(cfg, seed=4)
  model = Transformer(inference_model_config(cfg))
  contrast = ContrastConfig(beta=1.5, alpha=0.05, weak="rank:2")
  new, logits = generate_tokens(model, params, PROMPTS, 6, return_logits=True, contrast=contrast)
  # Independent weak model: the same params, each token routed to its 2nd-ranked expert.
  weak_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router="rank_k", top_k=2))
  weak_model = Transformer(inference_model_config(weak_cfg))
  strong_refs = full_forward_logits(model, params, PROMPTS, new)  # uncached, no padding
  weak_refs = full_forward_logits(weak_model, params, PROMPTS, new)
  masked = 0
  for b in range(len(PROMPTS)):
    ref = _reference(strong_refs[b], weak_refs[b], 1.5, 0.05)
    np.testing.assert_allclose(logits[b], ref, rtol=1e-4, atol=1e-4)  # -inf where ref is
    assert new[b] == np.argmax(ref, axis=-1).tolist()  # greedy on the contrast
    assert not np.allclose(strong_refs[b], weak_refs[b], atol=1e-2)  # the routings differ
    masked += int(np.sum(np.isneginf(ref)))
  assert masked > 0  # the plausibility mask took part
  standard = generate_tokens(model, params, PROMPTS, 6)
  assert new != standard  # the contrast changed some choice
  # beta = 0 is standard greedy decoding (the strong argmax is always plausible).
  zero = ContrastConfig(beta=0.0, alpha=0.05, weak="rank:2")  # same compiled decode
  assert generate_tokens(model, params, PROMPTS, 6, contrast=zero) == standard


def test_weak_routing_is_refused_where_undefined():
  with pytest.raises(ValueError, match="expert_choice.*weak activation"):
    weak_moe_config(MoEConfig(num_experts=4, expert_d_ff=8, router="expert_choice"), "top1")
  with pytest.raises(ValueError, match="null experts.*top1"):
    weak_moe_config(make_moe_cfg("null_experts"), "rank:2")
  assert weak_moe_config(make_moe_cfg("null_experts"), "top1").top_k == 1
  with pytest.raises(ValueError, match="rank 5"):
    weak_moe_config(MoEConfig(num_experts=4, expert_d_ff=8), "rank:5")
  for bad in ("rank:0", "rank", "top2", "rank:x"):
    with pytest.raises(ValueError, match="scmoe_weak"):
      ContrastConfig(weak=bad)
  with pytest.raises(ValueError, match="scmoe_beta"):
    ContrastConfig(beta=-0.1)
  with pytest.raises(ValueError, match="scmoe_alpha"):
    ContrastConfig(alpha=1.5)


def test_cli_rejects_bad_scmoe_flags_with_rc_2(capsys):
  from moejax.generate import main as generate_main

  argv = ["--workdir", "/nonexistent", "--prompt_ids", "1,2", "--decoding", "scmoe"]
  assert generate_main(argv + ["--scmoe_weak", "rank:0"]) == 2
  assert "scmoe_weak" in capsys.readouterr().err
  assert generate_main(argv + ["--scmoe_beta", "-1"]) == 2


@pytest.mark.slow
def test_generate_cli_scmoe_prints_the_contrast_greedy_continuation(data_dir, tmp_path, capsys):
  from moejax.generate import main as generate_main
  from moejax.inference.contrast import weak_model_config

  workdir, cfg, params = random_run(data_dir, tmp_path)
  capsys.readouterr()
  argv = ["--workdir", workdir, "--max_new_tokens", "5", "--prompt_ids", "1,72,101"]
  argv += ["--decoding", "scmoe", "--scmoe_beta", "0.8", "--scmoe_alpha", "0.1"]
  assert generate_main(argv + ["--scmoe_weak", "top1"]) == 0
  printed = [int(t) for t in capsys.readouterr().out.split()[0].split(",")]
  model = Transformer(inference_model_config(cfg))
  weak = Transformer(inference_model_config(weak_model_config(cfg, "top1")))
  strong_ref = full_forward_logits(model, params, [[1, 72, 101]], [printed])[0]
  weak_ref = full_forward_logits(weak, params, [[1, 72, 101]], [printed])[0]
  ref = _reference(strong_ref, weak_ref, 0.8, 0.1)
  assert printed == np.argmax(ref, axis=-1)[: len(printed)].tolist()  # cut after eos (id 2)


@pytest.mark.slow
def test_sharded_scmoe_generation_equals_one_device():
  from moejax.training.experiment import build_experiment
  from tests.helpers import tiny_config

  config = tiny_config("/unused", mesh=(2, 2, 2))
  with config.unlocked():
    config.model.num_layers, config.model.first_moe_layer = 1, 0
  exp = build_experiment(config)
  cfg = exp.model_cfg
  params = random_params(cfg, seed=2)
  contrast = ContrastConfig(beta=0.9, alpha=0.1, weak="rank:2")
  one_model = Transformer(inference_model_config(cfg))
  one = generate_tokens(one_model, params, PROMPTS, 5, return_logits=True, contrast=contrast)
  sharded_params = jax.device_put(params, exp.state_shardings.params)
  model = Transformer(inference_model_config(cfg, exp.mesh), mesh=exp.mesh)
  many = generate_tokens(model, sharded_params, PROMPTS, 5, return_logits=True, contrast=contrast)
  assert many[0] == one[0]
  np.testing.assert_allclose(many[1], one[1], rtol=1e-5, atol=1e-5)
