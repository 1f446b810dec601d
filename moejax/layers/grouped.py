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
                Large experts run in ``lax.scan`` steps of at most
                ``BLOCKED_WEIGHT_BYTES`` of gathered weights. XLA:CPU has no ragged_dot
                kernel (its generic lowering multiplies every row by every expert), so
                this is the CPU path.

Both sit behind a fast path (``moe.dropless_windows`` = (c_1 < c_2 < ...)): for the
smallest window L_i = ceil(c_i * A_expected / E) that holds every expert's load (the usual
case for a balanced router), the rows go to dense [E, L_i, d] windows and run as one batched
matmul per expert ('eld,edf->elf', the capacity path's kernel, no per-block weight gathers);
when no window holds the largest load, the exact grouped kernel runs. ``jax.lax.switch``
executes one branch, so the result is always dropless and exact; its backward
(``switched_ffn``) is one more switch over hand-written gated-FFN gradients.

Rows move by ``permute_rows``: a gather both ways (its transpose is the inverse gather,
not a scatter-add, which is slow on XLA:CPU).
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.ffn import ACTIVATIONS, gated_ffn_2d, gated_ffn_2d_grads


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


def row_sources(row: jax.Array, num_rows: int) -> jax.Array:
  """The inverse of an injective placement: i32[num_rows], the item a with row[a] = j in row
  j, len(row) where none (items whose row is out of range are placed nowhere)."""
  a = row.shape[0]
  return (
    jnp.full((num_rows,), a, jnp.int32).at[row].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
  )


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


def sort_rows(
  expert: jax.Array, valid: jax.Array, num_experts: int, block: int, ranked=None
) -> SortedRows:
  """Sorts assignments by expert; each expert's rows start on a multiple of `block`.

  expert: i32[A]; valid: bool[A]; ranked: ``rank_in_group(expert, valid, E)`` if already
  computed. Rows: NB * block with NB = (A + E (block - 1)) // block.
  """
  a, e = expert.shape[0], num_experts
  rank, counts = ranked if ranked is not None else rank_in_group(expert, valid, e)
  padded = (counts + block - 1) // block * block  # [E]
  padded_start = jnp.cumsum(padded) - padded
  num_blocks = (a + e * (block - 1)) // block
  num_rows = num_blocks * block
  row = jnp.where(valid, padded_start[jnp.where(valid, expert, 0)] + rank, num_rows)
  row_source = row_sources(row, num_rows)
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


# Gathered block weights per step of the blocked kernel: at most this many bytes (3 [c, d, f]
# gathers), so memory stays bounded at any model size (Mixtral's 8 experts, d 4096, f 14336
# gather 352 MB per block in bf16: 1 block per step; toy layers take every block at once).
BLOCKED_WEIGHT_BYTES = 256 * 2**20


def blocked_chunk(num_blocks: int, w_gate: jax.Array) -> int:
  """Blocks per step c of ``blocked_ffn``: all when 3 c d f weights fit
  ``BLOCKED_WEIGHT_BYTES``, else the most that fit (at least 1)."""
  per_block = 3 * w_gate.shape[-2] * w_gate.shape[-1] * w_gate.dtype.itemsize
  return max(1, min(num_blocks, BLOCKED_WEIGHT_BYTES // per_block))


def blocked_ffn(
  rows: jax.Array,
  sorted_rows: SortedRows,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  activation: str,
) -> jax.Array:
  """Gated FFN of each block's expert: rows [NB * B, d] -> [NB * B, d].

  'nbd,ndf->nbf' with W[block_expert]: one batched matmul over c blocks at a time
  (``blocked_chunk``); its weight gradient is a segment sum over the (expert-sorted)
  blocks. With several steps (large experts) the steps run in a ``lax.scan`` whose body is
  rematerialised except for its pre-activations, so the [c, d, f] weight gathers are never
  stored: memory O(c d f + NB B f), not O(NB d f).
  """
  act = ACTIVATIONS[activation]
  nb, b, d = sorted_rows.block_expert.shape[0], sorted_rows.block, rows.shape[-1]

  def run(x, be):  # x [c, B, d], be i32[c]
    a_gate = checkpoint_name(jnp.einsum("nbd,ndf->nbf", x, w_gate[be]), "blocked_a_gate")
    a_up = checkpoint_name(jnp.einsum("nbd,ndf->nbf", x, w_up[be]), "blocked_a_up")
    return jnp.einsum("nbf,nfd->nbd", act(a_gate) * a_up, w_down[be])

  c = blocked_chunk(nb, w_gate)
  x, be = rows.reshape(nb, b, d), sorted_rows.block_expert
  if c >= nb:
    return run(x, be).reshape(nb * b, d)
  steps = -(-nb // c)  # pad to whole steps: zero rows of the last expert give zero outputs
  x = jnp.pad(x, ((0, steps * c - nb), (0, 0), (0, 0))).reshape(steps, c, b, d)
  be = jnp.pad(be, (0, steps * c - nb), mode="edge").reshape(steps, c)
  policy = jax.checkpoint_policies.save_only_these_names("blocked_a_gate", "blocked_a_up")
  step = jax.checkpoint(lambda carry, xs: (carry, run(*xs)), policy=policy)
  _, y = jax.lax.scan(step, None, (x, be))
  return y.reshape(steps * c * b, d)[: nb * b]


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


def window_size(expected_rows: int, num_experts: int, factor: float) -> int:
  """L = ceil(factor * expected_rows / E) rows per expert, rounded up to a multiple of 8."""
  rows = math.ceil(factor * expected_rows / num_experts)
  return max(8, (rows + 7) // 8 * 8)


def window_sizes(windows: tuple, expected_rows: int, num_experts: int, num_rows: int) -> list:
  """The fast path's window sizes L_i, increasing; a size >= num_rows holds any load, so
  none past the first such is kept (and the exact kernel is then never needed)."""
  sizes = sorted({window_size(expected_rows, num_experts, c) for c in windows})
  full = [size for size in sizes if size >= num_rows]
  return [size for size in sizes if size < num_rows] + full[:1]


def fast_path_branch(counts: jax.Array, sizes: list) -> jax.Array:
  """i32 index of the smallest window in `sizes` holding max(counts); len(sizes) (the exact
  kernel) when none does."""
  return jnp.sum(jnp.asarray(sizes, jnp.int32) < jnp.max(counts)).astype(jnp.int32)


def window_slots(
  expert: jax.Array, valid: jax.Array, rank: jax.Array, window: int, num_experts: int
):
  """Assignment a -> row expert[a] * L + rank[a] of the [E * L] window rows.

  Returns (slot i32[A] (E * L for invalid assignments), slot_source i32[E * L] (the
  assignment in each row, A where empty)). Exact only when every count is <= L.
  """
  slot = jnp.where(valid, expert * window + rank, num_experts * window).astype(jnp.int32)
  return slot, row_sources(slot, num_experts * window)


def _pad_rows(x: jax.Array, n: int) -> jax.Array:
  return jnp.pad(x, ((0, n - x.shape[0]), (0, 0))) if n > x.shape[0] else x


def _pad_index(index: jax.Array, n: int, fill: int) -> jax.Array:
  return jnp.pad(index, (0, n - index.shape[0]), constant_values=fill)


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
  windows: tuple = (),
  expected_rows: int | None = None,
  branch_axes: tuple = (),
) -> jax.Array:
  """Runs each valid assignment's input through its expert; no work for invalid ones.

  Args:
    x: [A, d], each assignment's input.
    expert: i32[A] in [0, E); valid: bool[A]; weights [E, d, f], [E, d, f], [E, f, d].
    impl: 'blocked' or 'ragged_dot'; block_size: B of 'blocked' (None: automatic).
    windows: the fast path's factors c_i (module docstring); () disables it.
    expected_rows: A_expected, the mean number of valid rows the windows are sized for
      (default A; the expert-parallel layer passes its local assignment count).
    branch_axes: inside ``shard_map``, every mesh axis: all devices then take the same
      branch (the largest any needs), so collectives XLA or JAX's transpose place inside a
      branch are entered by every device (different branches deadlock).
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
  rank, counts = ranked = rank_in_group(expert, valid, e)
  sizes = window_sizes(windows, expected_rows or a, e, a)
  if not sizes:  # the exact kernel alone
    sorted_rows = sort_rows(expert, valid, e, block, ranked)
    source, dest = sorted_rows.row_source, sorted_rows.row
    rows = permute_rows(x, source, dest)
    out = _exact_ffn(rows, w_gate, w_up, w_down, sorted_rows, impl, activation)
    return permute_rows(out, dest, source)
  # One layout per branch, all indexing one row buffer of n rows: (source [n], dest [A]).
  layouts = [window_slots(expert, valid, rank, size, e)[::-1] for size in sizes]
  exact = None
  if sizes[-1] < a:  # a load no window holds is possible: the exact kernel is a branch
    exact = sort_rows(expert, valid, e, block, ranked)
    layouts.append((exact.row_source, exact.row))
  n = max(source.shape[0] for source, _ in layouts)
  branch = fast_path_branch(counts, sizes)
  if branch_axes:  # JAX >= 0.11 refuses a pmax over axes its input does not vary over
    branch = jax.lax.pmax(_vary_over(branch, branch_axes), branch_axes)
  source = jnp.stack([_pad_index(s, n, a) for s, _ in layouts])[branch]  # [n]
  dest = jnp.where(valid, jnp.stack([d for _, d in layouts])[branch], n)  # [A]
  rows = permute_rows(x, source, dest)  # [n, d]
  rows, w_gate, w_up, w_down = _vary_alike(rows, w_gate, w_up, w_down)
  out = switched_ffn(tuple(sizes), impl, activation, branch, rows, w_gate, w_up, w_down, exact)
  return permute_rows(out, dest, source)


# ------------------------------------------------------------------------------------------
# The fast path's switch, with one backward for all branches.
#
# Differentiating ``lax.switch`` makes every branch's residuals outputs that every branch
# must fill (zeros when not taken): with three windows that is three sets of [E L_i, f]
# activations written per step. ``switched_ffn`` instead saves one set, the taken window's
# pre-activations a_gate, a_up in a common [E L_max, f] buffer, and its backward is a
# second switch over hand-written gated-FFN gradients (the exact kernel recomputes).
# ------------------------------------------------------------------------------------------


def _varying_axes(a: jax.Array) -> frozenset:
  """The mesh axes `a` varies over inside ``shard_map`` (empty outside)."""
  return jax.typeof(a).mat.varying


def _vary_over(a: jax.Array, axes) -> jax.Array:
  """`a` cast to vary over `axes` as well (``lax.pcast``; no-op where it already does)."""
  missing = tuple(sorted(frozenset(axes) - _varying_axes(a)))
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def _vary_alike(*arrays):
  """Inside ``shard_map``: each array cast to vary over the union of the arrays' varying
  mesh axes (no-op outside). A custom VJP's gradients must have its inputs' types, and
  these products vary over all of them; the casts' transposes (psums) then sum the partial
  gradients, as autodiff would (e.g. dx over a model-sharded expert width)."""
  axes = frozenset().union(*map(_varying_axes, arrays))
  return tuple(_vary_over(a, axes) for a in arrays)


def _over_experts(fn, *args):
  """fn applied to each expert's slice of args (leading axis E), outputs stacked on axis 0.

  On CPU with few experts, one 2-D matmul per expert: XLA:CPU runs 2-D weight gradients
  faster than batched ones (measured 13% faster for 8 experts, 50% slower for 64);
  elsewhere one batched matmul per einsum ('eld,edf->elf', via vmap).
  """
  e = args[0].shape[0]
  if e <= 16 and jax.default_backend() == "cpu":
    outs = [fn(*(arg[i] for arg in args)) for i in range(e)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return jax.vmap(fn)(*args)


def _windows(rows, e, size):
  """The first E * size rows [.., d] as per-expert windows [E, size, d]."""
  return rows[: e * size].reshape(e, size, rows.shape[-1])


def _flat_padded(x, n):
  """[E, L, c] -> [n, c], zero rows past E * L."""
  return _pad_rows(x.reshape(-1, x.shape[-1]), n)


def _exact_ffn(rows, w_gate, w_up, w_down, sorted_rows, impl, activation):
  """The exact grouped kernel on the first NB * B of rows [n, d] -> [n, d]."""
  rows_in = rows[: sorted_rows.row_source.shape[0]]
  if impl == "blocked":
    out = blocked_ffn(rows_in, sorted_rows, w_gate, w_up, w_down, activation)
  else:
    out = ragged_ffn(rows_in, sorted_rows.counts, w_gate, w_up, w_down, activation)
  return _pad_rows(out, rows.shape[0])


def _switched_forward(sizes, impl, activation, branch, rows, w_gate, w_up, w_down, sorted_rows):
  """(out [n, d], a_gate [E L_max, f], a_up [E L_max, f]) of the taken branch: window
  i < len(sizes) (the pre-activations saved), else the exact kernel (zeros saved)."""
  e, f, n = w_gate.shape[0], w_gate.shape[-1], rows.shape[0]
  saved = e * sizes[-1]

  def window(size):
    def run(rows, w_gate, w_up, w_down):
      y, a_gate, a_up = _over_experts(
        functools.partial(gated_ffn_2d, activation=activation),
        _windows(rows, e, size),
        w_gate,
        w_up,
        w_down,
      )
      return _flat_padded(y, n), _flat_padded(a_gate, saved), _flat_padded(a_up, saved)

    return run

  def exact(rows, w_gate, w_up, w_down):
    out = _exact_ffn(rows, w_gate, w_up, w_down, sorted_rows, impl, activation)
    zeros, _ = _vary_alike(jnp.zeros((saved, f), out.dtype), out)
    return out, zeros, zeros

  branches = [window(size) for size in sizes] + ([exact] if sorted_rows is not None else [])
  return jax.lax.switch(branch, branches, rows, w_gate, w_up, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def switched_ffn(sizes, impl, activation, branch, rows, w_gate, w_up, w_down, sorted_rows):
  """The fast path's kernels on rows [n, d] laid out for `branch`: window i < len(sizes)
  runs expert e on rows [e L_i, (e + 1) L_i); len(sizes) runs the exact kernel over
  `sorted_rows` (None when a window holds any load). -> [n, d], zero rows unused."""
  return _switched_forward(
    sizes, impl, activation, branch, rows, w_gate, w_up, w_down, sorted_rows
  )[0]


def _switched_fwd(sizes, impl, activation, branch, rows, w_gate, w_up, w_down, sorted_rows):
  out, a_gate, a_up = _switched_forward(
    sizes, impl, activation, branch, rows, w_gate, w_up, w_down, sorted_rows
  )
  return out, (branch, rows, a_gate, a_up, w_gate, w_up, w_down, sorted_rows)


def _switched_bwd(sizes, impl, activation, res, dout):
  branch, rows, a_gate, a_up, w_gate, w_up, w_down, sorted_rows = res
  e, n = w_gate.shape[0], rows.shape[0]

  def window(size):
    def run(rows, a_gate, a_up, w_gate, w_up, w_down, dout):
      dx, dw_gate, dw_up, dw_down = _over_experts(
        functools.partial(gated_ffn_2d_grads, activation=activation),
        _windows(rows, e, size),
        _windows(a_gate, e, size),
        _windows(a_up, e, size),
        w_gate,
        w_up,
        w_down,
        _windows(dout, e, size),
      )
      return _flat_padded(dx, n), dw_gate, dw_up, dw_down

    return run

  def exact(rows, a_gate, a_up, w_gate, w_up, w_down, dout):
    fn = functools.partial(_exact_ffn, sorted_rows=sorted_rows, impl=impl, activation=activation)
    _, vjp = jax.vjp(fn, rows, w_gate, w_up, w_down)
    return vjp(dout)

  branches = [window(size) for size in sizes] + ([exact] if sorted_rows is not None else [])
  grads = jax.lax.switch(branch, branches, rows, a_gate, a_up, w_gate, w_up, w_down, dout)
  return (None, *grads, None)


switched_ffn.defvjp(_switched_fwd, _switched_bwd)
