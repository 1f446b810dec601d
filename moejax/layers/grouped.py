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

The fast path (``moe.dropless_windows`` = (c_1 < c_2 < ...)) covers the usual, balanced
case without either kernel: every expert's first L = ceil(c_1 A_expected / E) rows (its
*main window*) run as dense per-expert matmuls ('ld,df->lf' per expert on CPU with few
experts, else one batched 'eld,edf->elf'); their hand-written backward
(``windowed_ffn``) reuses the pre-activations as the matmuls wrote them (no buffer is
padded or copied for it). The rows past L (the overflow: a load above
c_1 times the mean) run in a ``lax.while_loop``, one block of B = L_2 - L rows of one
expert per step ('ld,df->lf' with that expert's weights), sum_e ceil(over_e / B) steps:
zero when every load fits. Its backward recomputes each step's pre-activations. With
c_1 = 1 the main windows hold exactly the A_expected rows of a balanced load, and an
unbalanced one costs its overflow rounded up to blocks of B, not E (L - A / E) padded
rows. The result is always dropless and exact. The inputs are gathered straight from the
tokens (assignment a reads token a // K): no [A, d] copy of them, and every slice a matmul
reads is its own gather (XLA:CPU copies each slice of a buffer that feeds a matmul).

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
  repeat: int = 1,
) -> jax.Array:
  """Runs each valid assignment's input through its expert; no work for invalid ones.

  Args:
    x: [A / repeat, d]: assignment a's input is x[a // repeat] (repeat = K when x holds
      the tokens of K-choice assignments: no [A, d] copy of them is made).
    expert: i32[A] in [0, E); valid: bool[A]; weights [E, d, f], [E, d, f], [E, f, d].
    impl: 'blocked' or 'ragged_dot' (the exact kernel); block_size: B of 'blocked'
      (None: automatic).
    windows: the fast path's factors (module docstring); () disables it.
    expected_rows: A_expected, the mean number of valid rows the window is sized for
      (default A; the expert-parallel layer passes its local assignment count).
  Returns:
    [A, d]: FFN_{expert[a]}(x[a // repeat]) where valid, 0 elsewhere.
  """
  a, e = expert.shape[0], w_gate.shape[0]
  if impl not in ("blocked", "ragged_dot"):
    raise ValueError(f"grouped_ffn: unknown impl {impl!r} (allowed: 'blocked', 'ragged_dot')")
  ranked = rank_in_group(expert, valid, e)
  sizes = window_sizes(windows, expected_rows or a, e, a)
  if not sizes:  # the exact kernel alone
    block = block_size or auto_block_size(a, e)
    x_assign = _repeat_rows(x, repeat)
    sorted_rows = sort_rows(expert, valid, e, block if impl == "blocked" else 1, ranked)
    source, dest = sorted_rows.row_source, sorted_rows.row
    rows = permute_rows(x_assign, source, dest)
    out = _exact_ffn(rows, w_gate, w_up, w_down, sorted_rows, impl, activation)
    return permute_rows(out, dest, source)
  index = window_index(expert, valid, ranked, sizes)
  x, w_gate, w_up, w_down = _vary_alike(*map(jnp.asarray, (x, w_gate, w_up, w_down)))
  return windowed_ffn(activation, repeat, x, w_gate, w_up, w_down, index)


def _repeat_rows(x: jax.Array, repeat: int) -> jax.Array:
  """[N, d] -> [N * repeat, d], row i = x[i // repeat]."""
  if repeat == 1:
    return x
  return jnp.broadcast_to(x[:, None], (x.shape[0], repeat, x.shape[-1])).reshape(-1, x.shape[-1])


@flax.struct.dataclass
class WindowIndex:
  """Where each assignment runs on the fast path (``window_index``).

  main_slot: i32[A], row expert * L + rank in the main windows (E * L: not there).
  main_source: i32[E * L], the assignment in each main row (A: empty).
  over: the overflow (rank >= L) sorted by expert in blocks of one expert's rows
    (``sort_rows``), one block per loop step; None when no load can exceed L.
  """

  main_slot: jax.Array
  main_source: jax.Array
  over: SortedRows | None
  window: int = flax.struct.field(pytree_node=False)


def overflow_block(sizes) -> int:
  """B, the overflow loop's rows per step: L_2 - L_1, or L_1 / 4 (a multiple of 8) with one
  window size."""
  if len(sizes) > 1:
    return sizes[1] - sizes[0]
  return max(8, sizes[0] // 32 * 8)


def window_index(expert, valid, ranked, sizes) -> WindowIndex:
  """The fast path's layout: main windows of L = sizes[0] rows per expert; the rows past
  them (ranks >= L) in blocks of ``overflow_block(sizes)`` rows of one expert, when some
  load can exceed L."""
  a = expert.shape[0]
  rank, counts = ranked
  e, window = counts.shape[0], sizes[0]
  in_main = valid & (rank < window)
  main_slot = jnp.where(in_main, expert * window + rank, e * window).astype(jnp.int32)
  main_source = row_sources(main_slot, e * window)
  if window >= a:  # the window holds any load: no overflow
    return WindowIndex(main_slot, main_source, None, window)
  over = valid & (rank >= window)
  over_counts = jnp.maximum(counts - window, 0)
  block = overflow_block(sizes)
  over_rows = sort_rows(expert, over, e, block, (jnp.where(over, rank - window, 0), over_counts))
  return WindowIndex(main_slot, main_source, over_rows, window)


# ------------------------------------------------------------------------------------------
# The fast path: main windows (always run, residuals are the matmul outputs) and an overflow
# loop (a ``lax.while_loop``, one overflow block per step: zero steps when every load fits).
# ------------------------------------------------------------------------------------------


def _per_expert_2d(num_experts: int) -> bool:
  """One 2-D matmul per expert rather than one batched matmul: on CPU with few experts
  (XLA:CPU runs 2-D weight gradients faster: 13% for 8 experts; batched wins for 64)."""
  return num_experts <= 16 and jax.default_backend() == "cpu"


def _main_sources(index: WindowIndex, e: int) -> list:
  """The main rows' assignments, one piece per expert (2-D matmuls) or one [E L] piece."""
  if _per_expert_2d(e):
    w = index.window
    return [index.main_source[i * w : (i + 1) * w] for i in range(e)]
  return [index.main_source]


def _by_expert(rows: jax.Array, e: int) -> jax.Array:
  """[E L, c] -> [E, L, c]."""
  return rows.reshape(e, -1, rows.shape[-1])


def _flat(rows: jax.Array) -> jax.Array:
  """[E, L, c] -> [E L, c]."""
  return rows.reshape(-1, rows.shape[-1])


def _over_block(index: WindowIndex, step, repeat, x, weights):
  """Overflow loop step `step`: (assignments i32[B], its expert i32[], rows [B, d], the
  expert's weights ([d, f], [d, f], [f, d]))."""
  b = index.over.block
  assign = jax.lax.dynamic_slice_in_dim(index.over.row_source, step * b, b)
  expert = index.over.block_expert[step]
  weights = tuple(jax.lax.dynamic_index_in_dim(w, expert, 0, False) for w in weights)
  return assign, expert, _gather(x, assign // repeat), weights


def overflow_steps(index: WindowIndex) -> jax.Array:
  """i32[]: overflow loop steps, sum_e ceil(over_e / B) (0 when every load fits)."""
  b = index.over.block
  return jnp.sum((index.over.counts + b - 1) // b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def windowed_ffn(activation, repeat, x, w_gate, w_up, w_down, index):
  """The fast path: x [A / repeat, d] -> [A, d] (``grouped_ffn``), exact for any load."""
  return _windowed_fwd(activation, repeat, x, w_gate, w_up, w_down, index)[0]


def _windowed_fwd(activation, repeat, x, w_gate, w_up, w_down, index):
  e, weights = w_gate.shape[0], (w_gate, w_up, w_down)
  sources = _main_sources(index, e)
  rows = [_gather(x, source // repeat) for source in sources]  # fill A -> A / repeat
  ffn = functools.partial(gated_ffn_2d, activation=activation)
  if _per_expert_2d(e):  # (y, a_gate, a_up) per expert
    outs = [ffn(r, *(w[i] for w in weights)) for i, r in enumerate(rows)]
  else:
    (flat,) = rows
    outs = [tuple(map(_flat, jax.vmap(ffn)(_by_expert(flat, e), *weights)))]
  out = _gather(jnp.concatenate([y for y, _, _ in outs]), index.main_slot)  # [A, d]
  if index.over is not None:

    def step(carry):
      i, out = carry
      assign, _, xb, wb = _over_block(index, i, repeat, x, weights)
      return i + 1, out.at[assign].set(ffn(xb, *wb)[0], mode="drop")

    steps = overflow_steps(index)
    _, out = jax.lax.while_loop(lambda c: c[0] < steps, step, (jnp.zeros((), jnp.int32), out))
  residuals = (x, w_gate, w_up, w_down, index, rows, [(g, u) for _, g, u in outs])
  return out, residuals


def _windowed_bwd(activation, repeat, residuals, dout):
  x, w_gate, w_up, w_down, index, rows, pre = residuals
  e, weights = w_gate.shape[0], (w_gate, w_up, w_down)
  ffn = functools.partial(gated_ffn_2d, activation=activation)
  grads = functools.partial(gated_ffn_2d_grads, activation=activation)
  douts = [_gather(dout, source) for source in _main_sources(index, e)]
  if _per_expert_2d(e):  # (dx, dW_gate, dW_up, dW_down) per expert
    per = [
      grads(r, g, u, *(w[i] for w in weights), dy)
      for i, (r, (g, u), dy) in enumerate(zip(rows, pre, douts))
    ]
    dx_rows = jnp.concatenate([p[0] for p in per])
    dw = [jnp.stack([p[j] for p in per]) for j in (1, 2, 3)]
  else:
    ((g, u),), (r,), (dy,) = pre, rows, douts
    win = functools.partial(_by_expert, e=e)
    dx, *dw = jax.vmap(grads)(win(r), win(g), win(u), *weights, win(dy))
    dx_rows = _flat(dx)
  dx_assign = _gather(dx_rows, index.main_slot)  # [A, d]
  if index.over is not None:

    def step(carry):
      i, dx_assign, *dw = carry
      assign, expert, xb, wb = _over_block(index, i, repeat, x, weights)
      _, g, u = ffn(xb, *wb)  # recomputed, not saved
      dxb, *dwb = grads(xb, g, u, *wb, _gather(dout, assign))
      dx_assign = dx_assign.at[assign].add(dxb, mode="drop")
      return i + 1, dx_assign, *(_add_at(d, expert, db) for d, db in zip(dw, dwb))

    steps = overflow_steps(index)
    carry = (jnp.zeros((), jnp.int32), dx_assign, *dw)
    _, dx_assign, *dw = jax.lax.while_loop(lambda c: c[0] < steps, step, carry)
  if repeat > 1:  # dx[t] = sum_j dx_assign[t K + j], unrolled: XLA:CPU's reduce over a
    # size-K middle axis was ~3% of the layer's step
    by_choice = dx_assign.reshape(-1, repeat, dx_assign.shape[-1])
    dx_assign = functools.reduce(jnp.add, [by_choice[:, j] for j in range(repeat)])
  return (dx_assign, *dw, None)


windowed_ffn.defvjp(_windowed_fwd, _windowed_bwd)


# ------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------


def _add_at(stacked: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
  """stacked with value added to stacked[i] (a dynamic slice and update, not a scatter)."""
  current = jax.lax.dynamic_index_in_dim(stacked, i, 0, False)
  return jax.lax.dynamic_update_index_in_dim(stacked, current + value, i, 0)


def _vary_alike(*arrays):
  """Inside ``shard_map``: each array cast to vary over the union of the arrays' varying
  mesh axes (no-op outside). A custom VJP's gradients must have its inputs' types, and
  these products vary over all of them; the casts' transposes (psums) then sum the partial
  gradients, as autodiff would (e.g. dx over a model-sharded expert width)."""
  vma = lambda a: jax.typeof(a).mat.varying
  axes = frozenset().union(*map(vma, arrays))
  cast = lambda a: jax.lax.pcast(a, tuple(sorted(axes - vma(a))), to="varying")
  return tuple(cast(a) if axes - vma(a) else a for a in arrays)


def _exact_ffn(rows, w_gate, w_up, w_down, sorted_rows, impl, activation):
  """The exact grouped kernel on the sorted rows [NB * B, d] -> [NB * B, d]."""
  if impl == "blocked":
    return blocked_ffn(rows, sorted_rows, w_gate, w_up, w_down, activation)
  return ragged_ffn(rows, sorted_rows.counts, w_gate, w_up, w_down, activation)
