"""Grouped expert matmuls on expert-sorted rows (dropless MoE without slot buffers).

A dropless layer has A = T * K (token, choice) assignments, of which the valid ones (real,
selected experts) must each run through one expert. Instead of a [E, C = S] buffer per
expert (E/K times the work), the assignments are sorted by expert and the experts run as
one *grouped* matmul over the sorted rows (Megablocks, Gale et al., 2023; MaxText's
Megablox / ``ragged_dot``). Invalid assignments sort to the end and take no row.

  'ragged_dot'  rows [A, d] sorted by expert, group sizes n_e:
                h = ``jax.lax.ragged_dot(rows, W_e, n)`` (native on gpu/tpu)
  'blocked'     each expert's rows padded to a multiple of B and cut into blocks of B
                rows that belong to one expert: [NB, B, d] x W[expert_of_block]
                ('nbd,ndf->nbf'); NB = (A + E (B - 1)) // B bounds sum_e ceil(n_e / B).
                XLA:CPU has no ragged_dot kernel (its generic lowering multiplies every
                row by every expert), so this is the CPU path.

Rows move by ``permute_rows``: a gather both ways (its transpose is the inverse gather,
not a scatter-add, which is slow on XLA:CPU).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moejax.layers.ffn import ACTIVATIONS


def rank_in_group(group: jax.Array, valid: jax.Array, num_groups: int):
  """Stable rank of each valid item within its group, and the group sizes.

  Args:
    group: i32[A] in [0, num_groups); valid: bool[A].
  Returns:
    (rank i32[A] (0 for invalid items), counts i32[num_groups]). Sorting by the key
    (group, index) is one argsort; no [A, num_groups] one-hot is built.
  """
  a = group.shape[0]
  key = jnp.where(valid, group, num_groups).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)  # [A]
  counts = jnp.zeros((num_groups + 1,), jnp.int32).at[key].add(1)  # last: invalid
  start = jnp.cumsum(counts) - counts  # [num_groups + 1]
  rank_sorted = jnp.arange(a, dtype=jnp.int32) - start[key[order]]
  rank = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted)
  return jnp.where(valid, rank, 0), counts[:num_groups]


@flax.struct.dataclass
class SortedRows:
  """Where each assignment's row lives in the expert-sorted (block-padded) row buffer.

  row: i32[A], the row of each assignment (= num_rows for invalid ones: no row).
  row_source: i32[num_rows], the assignment whose input fills each row (A for padding).
  block_expert: i32[NB], the expert of each block of `block` rows.
  counts: i32[E], valid assignments per expert.
  """

  row: jax.Array
  row_source: jax.Array
  block_expert: jax.Array
  counts: jax.Array
  block: int = flax.struct.field(pytree_node=False)


def auto_block_size(num_rows: int, num_experts: int) -> int:
  """Largest power of two B in [8, 256] with E (B - 1) <= A / 4 (at most 1/4 padding).

  Measured on XLA:CPU, per-block overhead (the [NB, d, f] weight gathers and their
  gradients) outweighs padding: for 8 experts on 8192 rows B = 256 beats B = 64 by ~2x.
  """
  b = 256
  while b > 8 and num_experts * (b - 1) * 4 > num_rows:
    b //= 2
  return b


def sort_rows(expert: jax.Array, valid: jax.Array, num_experts: int, block: int) -> SortedRows:
  """Sorts assignments by expert; each expert's rows start on a multiple of `block`.

  expert: i32[A]; valid: bool[A]. Rows: NB * block with NB = (A + E (block - 1)) // block.
  """
  a, e = expert.shape[0], num_experts
  rank, counts = rank_in_group(expert, valid, e)
  padded = (counts + block - 1) // block * block  # [E]
  padded_start = jnp.cumsum(padded) - padded
  num_blocks = (a + e * (block - 1)) // block
  num_rows = num_blocks * block
  row = jnp.where(valid, padded_start[jnp.where(valid, expert, 0)] + rank, num_rows)
  row_source = (
    jnp.full((num_rows,), a, jnp.int32).at[row].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
  )
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block
  block_expert = jnp.searchsorted(jnp.cumsum(padded), block_start, side="right")
  block_expert = jnp.minimum(block_expert, e - 1).astype(jnp.int32)  # unused blocks: E-1
  return SortedRows(row.astype(jnp.int32), row_source, block_expert, counts, block)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index] along axis 0, zeros where index is out of range (>= len(x))."""
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def permute_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[i] = x[index[i]] (0 where index[i] is out of range), for an `index` that is
  injective on its in-range entries with inverse[j] = i where index[i] = j (out of range
  for rows j nothing reads). The gradient is then a gather too, dx[j] = dout[inverse[j]],
  instead of the scatter-add ``jnp.take``'s transpose is (slow on XLA:CPU)."""
  return _gather(x, index)


def _permute_fwd(x, index, inverse):
  return _gather(x, index), (index, inverse)


def _permute_bwd(res, dout):
  _, inverse = res
  return _gather(dout, inverse), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def blocked_ffn(
  rows: jax.Array,
  sorted_rows: SortedRows,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  activation: str,
) -> jax.Array:
  """Gated FFN of each block's expert: rows [NB * B, d] -> [NB * B, d].

  'nbd,ndf->nbf' with W[block_expert]: one batched matmul; its weight gradient is a
  segment sum over the (expert-sorted) blocks.
  """
  act = ACTIVATIONS[activation]
  nb, b = sorted_rows.block_expert.shape[0], sorted_rows.block
  x = rows.reshape(nb, b, rows.shape[-1])
  be = sorted_rows.block_expert
  h = act(jnp.einsum("nbd,ndf->nbf", x, w_gate[be])) * jnp.einsum("nbd,ndf->nbf", x, w_up[be])
  return jnp.einsum("nbf,nfd->nbd", h, w_down[be]).reshape(nb * b, -1)


def ragged_ffn(
  rows: jax.Array,
  counts: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  activation: str,
) -> jax.Array:
  """Gated FFN with ``jax.lax.ragged_dot``: rows [N, d] sorted by expert, the first
  counts[e] rows after expert e-1's going to expert e; rows past sum(counts) give 0."""
  act = ACTIVATIONS[activation]
  h = act(jax.lax.ragged_dot(rows, w_gate, counts)) * jax.lax.ragged_dot(rows, w_up, counts)
  return jax.lax.ragged_dot(h, w_down, counts)


def grouped_ffn(
  x: jax.Array,
  expert: jax.Array,
  valid: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  activation: str,
  impl: str,
  block_size: int | None = None,
) -> jax.Array:
  """Runs each valid assignment's input through its expert; no work for invalid ones.

  Args:
    x: [A, d], each assignment's input.
    expert: i32[A] in [0, E); valid: bool[A]; weights [E, d, f], [E, d, f], [E, f, d].
    impl: 'blocked' or 'ragged_dot'; block_size: B of 'blocked' (None: automatic).
  Returns:
    [A, d]: FFN_{expert[a]}(x[a]) where valid, 0 elsewhere.
  """
  a, e = expert.shape[0], w_gate.shape[0]
  if impl == "blocked":
    block = block_size or auto_block_size(a, e)
  elif impl == "ragged_dot":
    block = 1
  else:
    raise ValueError(f"grouped_ffn: unknown impl {impl!r} (allowed: 'blocked', 'ragged_dot')")
  sorted_rows = sort_rows(expert, valid, e, block)
  rows = permute_rows(x, sorted_rows.row_source, sorted_rows.row)  # [num_rows, d]
  if impl == "blocked":
    out = blocked_ffn(rows, sorted_rows, w_gate, w_up, w_down, activation)
  else:
    out = ragged_ffn(rows, sorted_rows.counts, w_gate, w_up, w_down, activation)
  return permute_rows(out, sorted_rows.row, sorted_rows.row_source)
