"""Multi-head Latent Attention and the DeepSeek-V2 model it builds: an independent float64
NumPy reference (loops over heads and positions) of the attention and of the whole model
(MLA + dense first layer + shared/routed experts with routed_scaling_factor), interleaved
RoPE, causality, the parameter tree and its logical axes, config validation."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.errors import ConfigError
from moejax.models import Transformer
from moejax.models.mla import LATENT_NORM_EPS, MLAttention
from moejax.models.rope import apply_rope_interleaved, interleaved_rope_angles
from moejax.moe_config import MoEConfig
from moejax.routers import route
from moejax.training.state import abstract_params
from tests.reference import gated_ffn_np, moe_layer_reference, softmax

B, L = 2, 10
MLA = dict(num_heads=4, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def model_cfg(q_lora_rank: int = 0, routed_scaling_factor: float = 1.0, **kw) -> ModelConfig:
  """A 3-layer DeepSeek-V2-like model: layer 0 dense, layers 1-2 MoE with a shared expert."""
  moe = MoEConfig(
    num_experts=5,
    expert_d_ff=8,
    router="shared_experts",
    num_shared_experts=1,
    top_k=2,
    router_order="softmax_topk",
    dropless=True,
    routed_scaling_factor=routed_scaling_factor,
  )
  base = dict(
    vocab_size=40,
    d_model=24,
    num_layers=3,
    d_ff=20,
    attention="mla",
    q_lora_rank=q_lora_rank,
    moe_every=1,
    first_moe_layer=1,
    rope_theta=300.0,
    rms_norm_eps=1e-5,
    max_len=32,
    moe=moe,
    **MLA,
  )
  base.update(kw)
  return ModelConfig(**base)


def _fan_in(name: str, shape: tuple) -> int:
  if "['o']" in name:  # [H, D_v, d]
    return shape[0] * shape[1]
  if len(shape) == 3 and name.split("']")[-2].endswith(("wi_gate", "wi_up", "wo")):
    return shape[1]  # stacked experts [E, in, out]
  return shape[0]


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random float32 params in NumPy (compiling the model's init costs ~10 s on CPU):
  kernels N(0, 1/fan_in), embeddings N(0, 1), norm scales U(0.5, 1.5) so that the
  references see them."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['embedding']"):
      value = rng.normal(size=leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) / math.sqrt(_fan_in(name, leaf.shape))
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg: ModelConfig, params, tokens):
  return Transformer(cfg).apply({"params": params}, tokens)


def tokens_for(cfg, seed=0, shape=(B, L)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


# ----------------------------------------------------------------------------------------
# float64 NumPy reference, written from the DeepSeek-V2 paper's equations.
# ----------------------------------------------------------------------------------------


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope_complex(x, theta):
  """x: [L, n, D]; the pair (x_2i, x_2i+1) as a complex number times exp(i p theta^(-2i/D))."""
  l, _, dim = x.shape
  z = x[..., 0::2] + 1j * x[..., 1::2]
  angle = np.arange(l)[:, None] * theta ** (-np.arange(0, dim, 2) / dim)  # [L, D/2]
  z = z * np.exp(1j * angle)[:, None, :]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def np_mla(x, p, cfg: ModelConfig):
  """x: [B, L, d] -> [B, L, d], one batch row, head and query position at a time."""
  dn, dr, rkv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
  out = np.zeros((x.shape[0], x.shape[1], cfg.num_heads, cfg.v_head_dim))
  for bi in range(x.shape[0]):
    xb = x[bi]
    if cfg.q_lora_rank:
      c_q = np_rms_norm(xb @ p["q_a"]["kernel"], p["q_norm"]["scale"], LATENT_NORM_EPS)
      q = np.einsum("lr,rhk->lhk", c_q, p["q_b"]["kernel"])
    else:
      q = np.einsum("ld,dhk->lhk", xb, p["q"]["kernel"])
    q = np.concatenate([q[..., :dn], np_rope_complex(q[..., dn:], cfg.rope_theta)], -1)
    kv_a = xb @ p["kv_a"]["kernel"]  # [L, r_kv + D_r]
    c_kv = np_rms_norm(kv_a[:, :rkv], p["kv_norm"]["scale"], LATENT_NORM_EPS)
    k_rope = np_rope_complex(kv_a[:, None, rkv:], cfg.rope_theta)[:, 0]  # [L, D_r]
    kv = np.einsum("lr,rhk->lhk", c_kv, p["kv_b"]["kernel"])
    for h in range(cfg.num_heads):
      k = np.concatenate([kv[:, h, :dn], k_rope], -1)  # head h's keys [L, D_n + D_r]
      v = kv[:, h, dn:]
      for t in range(x.shape[1]):
        scores = k[: t + 1] @ q[t, h] / math.sqrt(dn + dr)  # keys 0..t only
        out[bi, t, h] = softmax(scores) @ v[: t + 1]
  return np.einsum("blhk,hkd->bld", out, p["o"]["kernel"])


def np_deepseek_forward(cfg: ModelConfig, params, tokens):
  """Logits [B, L, V] of the DeepSeek-V2 model: routed experts' gates (softmax probs, not
  renormalised) times routed_scaling_factor, plus the shared experts."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = p["embed"]["embedding"][np.asarray(tokens)]
  for i in range(cfg.num_layers):
    lp = p[f"layers_{i}"]
    h = h + np_mla(np_rms_norm(h, lp["attn_norm"]["scale"], cfg.rms_norm_eps), lp["attn"], cfg)
    x = np_rms_norm(h, lp["ffn_norm"]["scale"], cfg.rms_norm_eps)
    f = lp["ffn"]
    if cfg.is_moe_layer(i):
      m = cfg.moe
      routed, _ = moe_layer_reference(
        x,
        {k: f[k] for k in ("router", "wi_gate", "wi_up", "wo")},
        router="topk",
        num_experts=m.num_experts,
        k=m.top_k,
        dropless=True,
        order="softmax_topk",
      )
      sh = f["shared"]
      y = m.routed_scaling_factor * routed + gated_ffn_np(
        x, sh["wi_gate"], sh["wi_up"], sh["wo"], "silu"
      )
    else:
      y = gated_ffn_np(x, f["wi_gate"], f["wi_up"], f["wo"], "silu")
    h = h + y
  x = np_rms_norm(h, p["final_norm"]["scale"], cfg.rms_norm_eps)
  return x @ p["lm_head"]["kernel"]


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


def test_interleaved_rope_rotates_complex_pairs():
  x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
  cos, sin = interleaved_rope_angles(jnp.arange(7), 8, 100.0)
  chex.assert_shape((cos, sin), (7, 4))
  got = apply_rope_interleaved(jnp.asarray(x), cos, sin)
  want = np.stack([np_rope_complex(x[b].astype(np.float64), 100.0) for b in range(2)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 0], x[:, 0])  # position 0 is not rotated
  np.testing.assert_allclose(
    np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
  )  # a rotation


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_mla_module_matches_numpy_reference(q_lora_rank):
  cfg = model_cfg(q_lora_rank)
  module = MLAttention(
    cfg.num_heads,
    cfg.kv_lora_rank,
    cfg.qk_nope_head_dim,
    cfg.qk_rope_head_dim,
    cfg.v_head_dim,
    q_lora_rank,
  )
  x = np.random.default_rng(1).normal(size=(B, L, cfg.d_model)).astype(np.float32)
  cos, sin = interleaved_rope_angles(jnp.arange(L), cfg.qk_rope_head_dim, cfg.rope_theta)
  params = init_params(cfg, seed=2)["layers_0"]["attn"]
  got = jax.jit(module.apply)({"params": params}, x, cos, sin)
  want = np_mla(x.astype(np.float64), params, cfg)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("q_lora_rank,scaling", [(0, 1.0), (10, 2.5)])
def test_deepseek_model_matches_numpy_reference(q_lora_rank, scaling):
  cfg = model_cfg(q_lora_rank, routed_scaling_factor=scaling)
  params = init_params(cfg, seed=q_lora_rank)
  tokens = tokens_for(cfg, seed=1)
  logits, aux = apply(cfg, params, tokens)
  chex.assert_shape(logits, (B, L, cfg.vocab_size))
  assert sorted(aux["metrics"]) == ["layers_1", "layers_2"]
  np.testing.assert_allclose(logits, np_deepseek_forward(cfg, params, tokens), rtol=2e-4, atol=2e-4)


def test_routed_scaling_factor_scales_only_the_combine_weights():
  logits = jax.random.normal(jax.random.key(0), (2, 6, 5))
  base = MoEConfig(
    num_experts=5, router="shared_experts", num_shared_experts=1, top_k=2, dropless=True
  )
  one = route(logits, base)
  for a in (0.5, 16.0):
    scaled = route(logits, dataclasses.replace(base, routed_scaling_factor=a))
    np.testing.assert_allclose(scaled.combine_weight, a * one.combine_weight, rtol=1e-6)
    chex.assert_trees_all_equal(
      (scaled.dispatch_index, scaled.slot_valid, scaled.aux_losses, scaled.metrics),
      (one.dispatch_index, one.slot_valid, one.aux_losses, one.metrics),
    )


@pytest.mark.parametrize("q_lora_rank,scaling", [(0, 1.0), (10, 2.5)])  # compiled above
def test_causal(q_lora_rank, scaling):
  cfg = model_cfg(q_lora_rank, routed_scaling_factor=scaling)
  params = init_params(cfg)
  tokens = tokens_for(cfg)
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % cfg.vocab_size)
  a, b = apply(cfg, params, tokens)[0], apply(cfg, params, changed)[0]
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_param_tree_names_shapes_and_logical_axes(q_lora_rank):
  cfg = model_cfg(q_lora_rank)
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, L), jnp.int32))[
    "params"
  ]  # boxed: logical names
  attn = abstract["layers_0"]["attn"]
  got = {
    "/".join(k.key for k in path): (tuple(leaf.value.shape), tuple(leaf.names))
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      attn, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
  }
  d, h, dn, dr, dv = cfg.d_model, cfg.num_heads, 6, 4, 5
  rkv, rq = cfg.kv_lora_rank, q_lora_rank
  want = {
    "kv_a/kernel": ((d, rkv + dr), ("embed", "kv_lora")),
    "kv_norm/scale": ((rkv,), ("kv_lora",)),
    "kv_b/kernel": ((rkv, h, dn + dv), ("kv_lora", "heads", "head_dim")),
    "o/kernel": ((h, dv, d), ("heads", "head_dim", "embed")),
  }
  if rq:
    want.update(
      {
        "q_a/kernel": ((d, rq), ("embed", "q_lora")),
        "q_norm/scale": ((rq,), ("q_lora",)),
        "q_b/kernel": ((rq, h, dn + dr), ("q_lora", "heads", "head_dim")),
      }
    )
  else:
    want["q/kernel"] = ((d, h, dn + dr), ("embed", "heads", "head_dim"))
  assert got == want
  # every layer has the same attention tree; the rest of the model is unchanged
  for i in range(cfg.num_layers):
    assert jax.tree.structure(abstract[f"layers_{i}"]["attn"]) == jax.tree.structure(attn)
  assert set(abstract["layers_1"]["ffn"]) == {"router", "wi_gate", "wi_up", "wo", "shared"}


def test_gradients_finite_and_nonzero_for_every_mla_param():
  cfg = model_cfg(10, routed_scaling_factor=2.5)
  params = init_params(cfg)
  tokens = tokens_for(cfg)

  def loss(p):
    logits, aux = Transformer(cfg).apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + sum(aux["aux_losses"].values())

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads["layers_1"]["attn"]):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_close_to_float32():
  cfg = model_cfg(10, routed_scaling_factor=2.5)
  params = init_params(cfg)
  tokens = tokens_for(cfg)
  full = apply(cfg, params, tokens)[0]
  half = apply(model_cfg(10, routed_scaling_factor=2.5, dtype="bfloat16"), params, tokens)[0]
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1 * float(jnp.abs(full).max()))


def test_gqa_default_is_unchanged_by_the_mla_fields():
  """The MLA fields do not touch a GQA model: same params and logits whatever they are."""
  kw = dict(
    vocab_size=40,
    d_model=24,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=6,
    d_ff=20,
    max_len=32,
  )
  a, b = ModelConfig(**kw), ModelConfig(**kw, kv_lora_rank=3, qk_rope_head_dim=2, q_lora_rank=5)
  assert a.attention == "gqa"
  chex.assert_trees_all_equal(abstract_params(a), abstract_params(b))
  assert "k" in abstract_params(a)["layers_0"]["attn"]
  params, tokens = init_params(a), tokens_for(a)
  np.testing.assert_array_equal(apply(a, params, tokens)[0], apply(b, params, tokens)[0])


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("attention", "mha", r"model\.attention='mha' is invalid: allowed: \('gqa', 'mla'\)"),
    ("qk_rope_head_dim", 5, r"model\.qk_rope_head_dim=5 is invalid: must be even"),
    ("kv_lora_rank", 0, r"model\.kv_lora_rank=0 is invalid: must be an int >= 1"),
    ("v_head_dim", 2.0, r"model\.v_head_dim=2\.0 is invalid"),
    ("q_lora_rank", -1, r"model\.q_lora_rank=-1 is invalid: must be an int >= 0"),
  ],
)
def test_mla_config_errors_name_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config({"attention": "mla", field: value})


@pytest.mark.parametrize(
  "router,value,match",
  [
    ("shared_experts", 0.0, "must be a finite number > 0"),
    ("shared_experts", float("inf"), "must be a finite number > 0"),
    ("topk", 2.0, "only router='shared_experts'"),
  ],
)
def test_routed_scaling_factor_validation(router, value, match):
  with pytest.raises(ConfigError, match=r"model\.moe\.routed_scaling_factor=.* " + match):
    MoEConfig.from_config(
      dict(router=router, num_shared_experts=int(router != "topk"), routed_scaling_factor=value)
    )
