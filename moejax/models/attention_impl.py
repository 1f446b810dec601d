"""Causal attention kernels behind one call: ``attend(q, k, v, scale, impl)``.

  q [B, L, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv] -> out [B, L, H, Dv]
  out_{l,h} = sum_{m <= l} softmax_m(q_{l,h} . k_{m,j(h)} * scale) v_{m,j(h)}

``impl``: reference (float32 [L, L] scores), blockwise (online softmax over key blocks in a
checkpointed ``lax.scan``; Milakov & Gimelshein, 2018; Rabe & Staats, 2021; Dao et al.,
2022), xla / cudnn (``jax.nn.dot_product_attention``; a narrower v is zero-padded), auto.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 512  # key block of the blockwise kernel
BLOCKWISE_MIN_LEN = 2048  # 'auto' uses blockwise from this length on (off GPU)


def resolve_impl(impl: str, length: int, backend: str | None = None) -> str:
  """The kernel 'auto' stands for on `backend` (default: jax's) at sequence `length`."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "gpu":
    return "cudnn"
  return "blockwise" if length >= BLOCKWISE_MIN_LEN else "reference"


def causal_mask(length: int) -> jax.Array:
  """bool [L, L]: query l may attend to key m iff m <= l."""
  pos = jnp.arange(length)
  return pos[None, :] <= pos[:, None]


def gqa_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None
) -> jax.Array:
  """Masked softmax attention with grouped kv heads, materialising the scores.

  q: [B, L, H, Dk]; k: [B, M, H_kv, Dk]; v: [B, M, H_kv, Dv]; mask: bool [L, M]
  -> [B, L, H, Dv]. Scores (scaled by `scale`, default 1/sqrt(Dk)) and softmax in
  float32; the weighted sum of v in v's dtype.
  """
  b, l, h, dk = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, l, hkv, h // hkv, dk)  # head h = j * G + r
  scores = jnp.einsum("bljrk,bmjk->bjrlm", q, k, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(dk)) if scale is None else scores * jnp.float32(scale)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bjrlm,bmjk->bljrk", probs, v)
  return out.reshape(b, l, h, v.shape[-1])


def blockwise_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, block: int = BLOCK
) -> jax.Array:
  """Causal attention with an online softmax over key blocks (module docstring).

  Per key block n with scores s [.., L, Bk]: m' = max(m, max_k s), p = exp(s - m'),
  l' = l e^{m - m'} + sum_k p, acc' = acc e^{m - m'} + p v_n; out = acc / l.
  """
  b, l, h, dk = q.shape
  m_len, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  block = min(block, m_len)
  pad = -m_len % block
  if pad:  # padded keys sit after every query position, so the causal mask hides them
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  n = (m_len + pad) // block
  k_blocks = jnp.moveaxis(k.reshape(b, n, block, hkv, dk), 1, 0)  # [N, B, Bk, Hkv, Dk]
  v_blocks = jnp.moveaxis(v.reshape(b, n, block, hkv, dv), 1, 0)  # [N, B, Bk, Hkv, Dv]
  q = q.reshape(b, l, hkv, h // hkv, dk)
  q_pos = jnp.arange(l)

  @jax.checkpoint
  def step(carry, xs):
    m, s_sum, acc = carry  # [B, Hkv, G, L], [B, Hkv, G, L], [B, Hkv, G, L, Dv] (f32)
    k_n, v_n, start = xs
    s = jnp.einsum("bljrk,bmjk->bjrlm", q, k_n, preferred_element_type=jnp.float32)
    s = s.astype(jnp.float32) * jnp.float32(scale)
    visible = (start + jnp.arange(block))[None, :] <= q_pos[:, None]  # [L, Bk]
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # Rows with nothing visible yet keep m = -inf; shift by 0 there to avoid inf - inf.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - shift[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))
    s_sum = s_sum * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
      "bjrlm,bmjk->bjrlk", p.astype(v_n.dtype), v_n, preferred_element_type=jnp.float32
    )
    return (m_new, s_sum, acc), None

  g = h // hkv
  init = (
    jnp.full((b, hkv, g, l), -jnp.inf, jnp.float32),
    jnp.zeros((b, hkv, g, l), jnp.float32),
    jnp.zeros((b, hkv, g, l, dv), jnp.float32),
  )
  starts = jnp.arange(n) * block
  (_, s_sum, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, starts))
  out = acc / s_sum[..., None]  # every query sees at least itself: s_sum >= 1
  return jnp.einsum("bjrlk->bljrk", out).reshape(b, l, h, dv).astype(v.dtype)


def _dot_product_attention(q, k, v, scale, implementation):
  dk, dv = q.shape[-1], v.shape[-1]
  if dv < dk:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dk - dv)))
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  out = jax.nn.dot_product_attention(
    q.astype(dtype),
    k.astype(dtype),
    v.astype(dtype),
    scale=scale,
    is_causal=True,
    implementation=implementation,
  )
  return out[..., :dv]


def attend(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None, impl: str = "reference"
) -> jax.Array:
  """Causal GQA attention by kernel `impl` (module docstring); out [B, L, H, Dv].

  scale: the score scale, default 1/sqrt(Dk).
  """
  impl = resolve_impl(impl, q.shape[1])
  if impl != "reference" and scale is None:
    scale = q.shape[-1] ** -0.5
  if impl == "reference":
    return gqa_attention(q, k, v, causal_mask(q.shape[1]), scale)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, scale)
  if impl in ("xla", "cudnn"):
    return _dot_product_attention(q, k, v, scale, impl)
  raise ValueError(f"unknown attention implementation {impl!r}")
