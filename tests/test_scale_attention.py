"""Memory-efficient attention kernels equal the materialised reference (values and
gradients): causal GQA, MLA (v_head_dim != qk dims), and the kernel 'auto' picks."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models.attention_impl import (
  attend,
  blockwise_attention,
  causal_mask,
  gqa_attention,
  resolve_impl,
)
from moejax.models.mla import MLAttention
from moejax.models.rope import interleaved_rope_angles


def _qkv(b=2, l=40, h=4, hkv=2, dk=8, dv=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (b, l, h, dk)),
    jax.random.normal(ks[1], (b, l, hkv, dk)),
    jax.random.normal(ks[2], (b, l, hkv, dv)),
  )


def _numpy_attention(q, k, v, scale):
  """Independent float64 reference: loops over heads, explicit causal softmax."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, l, h, _ = q.shape
  g = h // k.shape[2]
  out = np.zeros((b, l, h, v.shape[-1]))
  for i in range(h):
    s = np.einsum("blk,bmk->blm", q[:, :, i], k[:, :, i // g]) * scale
    s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, i] = np.einsum("blm,bmk->blk", p / p.sum(-1, keepdims=True), v[:, :, i // g])
  return out


@pytest.mark.parametrize("block", [8, 16, 64])  # 40 % 16 != 0: padded last block
@pytest.mark.parametrize("dv", [8, 12])
def test_blockwise_matches_numpy_reference(block, dv):
  q, k, v = _qkv(dv=dv)
  out = blockwise_attention(q, k, v, 8**-0.5, block=block)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, 8**-0.5), rtol=1e-5, atol=1e-5)
  ref = gqa_attention(q, k, v, causal_mask(q.shape[1]), 8**-0.5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "impl", [pytest.param("blockwise", marks=pytest.mark.slow), "xla"]
)  # blockwise gradients: the finite-difference test below
def test_kernel_gradients_match_reference(impl):
  q, k, v = _qkv(l=24)
  w = jax.random.normal(jax.random.key(5), (2, 24, 4, 8))
  loss = lambda impl, q, k, v: jnp.sum(attend(q, k, v, None, impl) * w)
  ref = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-5)


def test_blockwise_gradient_matches_finite_differences():
  q, k, v = _qkv(b=1, l=12, h=2, hkv=1, dk=4, dv=4)
  f = lambda q: jnp.sum(jnp.sin(blockwise_attention(q, k, v, 0.5, block=5)))
  g = jax.grad(f)(q)
  d = jax.random.normal(jax.random.key(9), q.shape)
  eps = 1e-3
  fd = (f(q + eps * d) - f(q - eps * d)) / (2 * eps)
  np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=2e-2)


def test_blockwise_backward_keeps_no_length_squared_buffer():
  """The jaxpr of the gradient holds no [.., L, L] array (only [.., L, block])."""
  l, block = 256, 32
  q, k, v = _qkv(b=1, l=l, h=2, hkv=1, dk=8, dv=8)
  jaxpr = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(blockwise_attention(q, k, v, 0.3, block))))(q)
  shapes = [var.aval.shape for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]

  def all_shapes(j):
    for eqn in j.eqns:
      yield from (getattr(v.aval, "shape", ()) for v in eqn.outvars)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from all_shapes(sub)

  shapes = list(all_shapes(jaxpr.jaxpr))
  assert shapes and not any(s[-2:] == (l, l) for s in shapes)
  assert any(s[-2:] == (l, block) for s in shapes)


@pytest.mark.parametrize("impl", [pytest.param("blockwise", marks=pytest.mark.slow), "xla"])
def test_mla_kernels_match_reference(impl):
  """MLA with D_n + D_r = 12 != D_v = 6: logits of the layer and its parameter grads."""
  b, l, d = 2, 20, 16
  x = jax.random.normal(jax.random.key(1), (b, l, d))
  cos, sin = interleaved_rope_angles(jnp.arange(l), 4, 1e4)
  make = lambda impl: MLAttention(
    num_heads=3, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, impl=impl
  )
  params = jax.jit(make("reference").init)(jax.random.key(2), x, cos, sin)
  loss = lambda impl, p: jnp.sum(make(impl).apply(p, x, cos, sin) ** 2)
  ref_out = jax.jit(make("reference").apply)(params, x, cos, sin)
  out = jax.jit(make(impl).apply)(params, x, cos, sin)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(
    jax.jit(jax.grad(functools.partial(loss, impl)))(params),
    jax.jit(jax.grad(functools.partial(loss, "reference")))(params),
    rtol=1e-4,
    atol=1e-5,
  )


def test_auto_picks_by_backend_and_length():
  assert resolve_impl("auto", 4096, "gpu") == "cudnn"
  assert resolve_impl("auto", 4096, "cpu") == "blockwise"
  assert resolve_impl("auto", 4096, "tpu") == "blockwise"
  assert resolve_impl("auto", 128, "cpu") == "reference"
  assert resolve_impl("xla", 128, "gpu") == "xla"
