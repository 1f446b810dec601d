"""Dropless MoE on expert-sorted assignments (issue 13).

The sorted path (expert_impl 'blocked' / 'ragged_dot') against the per-token loop reference
and against the C = S slot path it replaces (outputs, aux losses, metrics, gradients) for
every token-choice router; the expert-parallel row exchange against the unsharded layer on
the test meshes; the bounded exchange buffer's drops are counted exactly; and the compiled
dropless HLO holds no [E, S]-sized slot buffer or [S*K, E] one-hot.
"""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.layers import grouped
from moejax.layers.expert_parallel import rows_per_device
from moejax.layers.grouped import (
  blocked_chunk,
  grouped_ffn,
  overflow_block,
  overflow_steps,
  rank_in_group,
  sort_rows,
  window_index,
  window_sizes,
)
from moejax.layers.moe import MoELayer
from moejax.layers.routed import router_logits
from moejax.moe_config import MoEConfig
from moejax.parallel import make_mesh, shard_params
from moejax.routers import route
from tests.helpers import covering_params

try:
  from tests import reference as ref
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
  import reference as ref

D, F, E = 16, 32, 8
X_SHAPE = (4, 32, D)  # 128 tokens: 16 groups of 8

ROUTERS = {
  "topk": dict(router="topk", top_k=2),
  "topk_renorm": dict(router="topk", top_k=3, router_order="topk_softmax", activation="gelu"),
  "null_experts": dict(router="null_experts", num_null_experts=4, top_k=2),
  "shared_experts": dict(router="shared_experts", num_shared_experts=2, top_k=2),
  "top_p": dict(router="top_p", top_k=3, top_p=0.6, dynamic_loss_weight=0.01),
}
IMPLS = ("blocked", "ragged_dot")
MESHES = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1), (2, 2, 2), (1, 1, 1)]


def make_cfg(name: str, **kw) -> MoEConfig:
  kw = {
    **ROUTERS[name],
    "num_experts": E,
    "expert_d_ff": F,
    "dropless": True,
    "group_size": 8,
    **kw,
  }
  return MoEConfig(**kw, config_path="model.moe")


def random_params(cfg: MoEConfig, seed: int = 3, boxed: bool = False):
  """N(0, 1/fan_in) parameters, router weights 4x (clear routing margins)."""
  # Shapes and boxes only: the values are all drawn below (no init compile).
  tree = jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), jnp.zeros(X_SHAPE))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    scale = 4.0 if "router" in jax.tree_util.keystr(path) else 1.0
    return jnp.asarray(
      rng.standard_normal(leaf.shape) * scale / np.sqrt(leaf.shape[-2]), leaf.dtype
    )

  values = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(tree))
  return nn.meta.replace_boxed(tree, values) if boxed else values


def inputs(seed: int = 1):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32) for _ in range(2))


def loss_and_grads(layer: MoELayer):
  def loss(params, x, ct):
    y, aux = layer.apply({"params": params}, x)
    return jnp.sum(y * ct) + sum(aux["aux_losses"].values()), (y, aux)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def assert_close(actual, expected, rtol=1e-5):
  chex.assert_trees_all_equal_shapes(actual, expected)

  def check(path, a, e):
    e = np.asarray(e, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(
      np.asarray(a, np.float64), e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )

  jax.tree_util.tree_map_with_path(check, actual, expected)


@functools.cache
def capacity_result(name: str):
  """The C = S slot path's (loss, (y, aux)), grads: what the sorted path replaces."""
  cfg = make_cfg(name, expert_impl="capacity")
  out = loss_and_grads(MoELayer(cfg))(random_params(cfg), *inputs())
  return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


# ------------------------------------------------------------------------------------------
# Single device.
# ------------------------------------------------------------------------------------------


def test_grouped_ffn_matches_per_row_loop():
  """grouped_ffn == FFN_{expert[a]}(x[source[a]]) for valid rows, 0 for invalid ones, for
  block sizes that do and do not divide the group sizes (and empty experts)."""
  rng = np.random.default_rng(0)
  n, a, e, d, f = 10, 40, 5, 6, 7
  x = rng.standard_normal((n, d)).astype(np.float32)
  source = rng.integers(0, n, a).astype(np.int32)
  expert = rng.choice([0, 1, 3, 4], a).astype(np.int32)  # expert 2 empty
  valid = rng.random(a) < 0.7
  w = [rng.standard_normal(s).astype(np.float32) / 3 for s in ((e, d, f), (e, d, f), (e, f, d))]
  want = np.stack(
    [
      ref.gated_ffn_np(x[source[i]], w[0][expert[i]], w[1][expert[i]], w[2][expert[i]], "silu")
      if valid[i]
      else np.zeros(d)
      for i in range(a)
    ]
  )
  for impl, block in (
    ("blocked", 1),
    ("blocked", 3),
    ("blocked", 8),
    ("blocked", None),
    ("ragged_dot", None),
  ):
    got = jax.jit(grouped_ffn, static_argnums=(6, 7, 8))(
      x[source], expert, valid, *w, "silu", impl, block
    )
    np.testing.assert_allclose(
      np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"{impl} block={block}"
    )


@pytest.mark.parametrize("load", ["balanced", "sparse", "skewed"])
def test_fast_path_windows_equal_the_exact_kernel(load):
  """The fast path (main windows of L = c_1 A / E rows per expert, the overflow past them
  in a loop over blocks) == the exact kernel alone, outputs and gradients: sparse loads
  (few valid picks, as under null experts or top-p) fit the main windows (the loop takes
  no step), balanced ones overflow the default's smallest window (c_1 = 0.5),
  skewed ones take several loop steps; with a window of A rows there is no loop."""
  rng = np.random.default_rng(1)
  a, e, d, f = 96, 4, 6, 8
  expert = rng.integers(0, e, a) if load != "skewed" else np.where(rng.random(a) < 0.7, 2, 0)
  expert = jnp.asarray(expert, jnp.int32)
  valid = jnp.asarray(rng.random(a) < (0.4 if load == "sparse" else 0.9))
  x, ct = (jnp.asarray(rng.standard_normal((a, d)), jnp.float32) for _ in range(2))
  w = [jnp.asarray(rng.standard_normal(s) / 3, jnp.float32) for s in ((e, d, f),) * 2]
  w.append(jnp.asarray(rng.standard_normal((e, f, d)) / 3, jnp.float32))

  def run(windows):
    def loss(x, *w):
      y = grouped_ffn(x, expert, valid, *w, "silu", "blocked", 8, windows)
      return jnp.sum(y * ct), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, *w)

  windows = MoEConfig().dropless_windows
  sizes = window_sizes(windows, a, e, a)
  ranked = rank_in_group(expert, valid, e)
  steps = int(overflow_steps(window_index(expert, valid, ranked, sizes)))
  assert {"sparse": steps == 0, "balanced": steps >= 1, "skewed": steps >= 2}[load], steps
  # One block of B = L_2 - L_1 rows of one expert per step: sum_e ceil(over_e / B) steps.
  loads = np.bincount(np.asarray(expert)[np.asarray(valid)], minlength=e)
  over, block = np.maximum(loads - sizes[0], 0), overflow_block(sizes)
  assert block == sizes[1] - sizes[0] and steps == int(np.sum(-(-over // block)))
  want = run(())
  assert_close(run(windows), want)
  assert window_index(expert, valid, ranked, [a]).over is None
  assert_close(run((float(e),)), want)  # a window of A rows: no overflow loop


def test_blocked_kernel_in_steps_equals_one_shot_with_bounded_weight_gathers(monkeypatch):
  """With the gathered block weights capped (as for large experts), ``blocked_ffn`` runs
  c blocks per ``lax.scan`` step: outputs and gradients equal the one-shot kernel, and the
  compiled step's temporary memory no longer holds the [NB, d, f] weight gathers."""
  rng = np.random.default_rng(4)
  a, e, d, f, block = 200, 4, 64, 96, 8
  expert = jnp.asarray(rng.integers(0, e, a), jnp.int32)
  valid = jnp.asarray(rng.random(a) < 0.9)
  x, ct = (jnp.asarray(rng.standard_normal((a, d)), jnp.float32) for _ in range(2))
  w = [jnp.asarray(rng.standard_normal(s) / 8, jnp.float32) for s in ((e, d, f),) * 2]
  w.append(jnp.asarray(rng.standard_normal((e, f, d)) / 8, jnp.float32))

  def compiled():
    def loss(x, *w):
      return jnp.sum(grouped_ffn(x, expert, valid, *w, "silu", "blocked", block) * ct)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(x, *w).compile()

  one_shot = compiled()
  num_blocks = (a + e * (block - 1)) // block
  per_block = 3 * d * f * 4
  assert blocked_chunk(num_blocks, w[0]) == num_blocks
  monkeypatch.setattr(grouped, "BLOCKED_WEIGHT_BYTES", 3 * per_block)
  assert blocked_chunk(num_blocks, w[0]) == 3 and num_blocks % 3 != 0  # a padded last step
  stepped = compiled()
  assert_close(stepped(x, *w), one_shot(x, *w))
  gathers = num_blocks * per_block
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(one_shot) > gathers
  assert temp(stepped) < temp(one_shot) - gathers // 2


def test_windows_below_the_mean_serve_only_variable_k_routers():
  """Factors < 1 are kept for routers with null or unselected picks, dropped for fixed k
  (whose largest load is >= A / E, so such a window would never run)."""
  default = MoEConfig().dropless_windows
  assert min(default) < 1
  assert make_cfg("topk").resolved_dropless_windows() == tuple(c for c in default if c >= 1)
  assert make_cfg("shared_experts").resolved_dropless_windows() == (1.0, 1.0625)
  for name in ("null_experts", "top_p"):
    assert make_cfg(name).resolved_dropless_windows() == default
  assert make_cfg("topk", num_compressed_experts=2).resolved_dropless_windows() == default


def test_sort_rows_layout():
  """Rows of one expert are contiguous, start on a block boundary, keep assignment order;
  every block holds one expert; invalid assignments get no row."""
  expert = jnp.asarray([2, 0, 2, 1, 0, 2, 2, 1], jnp.int32)
  valid = jnp.asarray([1, 1, 0, 1, 1, 1, 1, 0], bool)
  rows = sort_rows(expert, valid, 3, block=2)
  num_rows = rows.row_source.shape[0]
  assert num_rows == (8 + 3 * 1) // 2 * 2
  np.testing.assert_array_equal(rows.counts, [2, 1, 3])
  # expert 0: assignments 1, 4 -> rows 0, 1; expert 1: 3 -> row 2; expert 2: 0, 5, 6 -> 4, 5, 6
  np.testing.assert_array_equal(rows.row, [4, 0, num_rows, 2, 1, 5, 6, num_rows])
  np.testing.assert_array_equal(rows.block_expert[:4], [0, 1, 2, 2])
  rank, counts = rank_in_group(expert, valid, 3)
  np.testing.assert_array_equal(rank, [0, 0, 0, 0, 1, 1, 2, 0])
  np.testing.assert_array_equal(counts, [2, 1, 3])


# By default: plain top-k on both kernels, and top-p (tokens with fewer than k experts).
SORTED_FAST = {("topk", "blocked"), ("topk", "ragged_dot"), ("top_p", "blocked")}


@pytest.mark.parametrize(
  "name,impl",
  [
    pytest.param(n, i, marks=() if (n, i) in SORTED_FAST else pytest.mark.slow)
    for n in ROUTERS
    for i in IMPLS
  ],
)
def test_sorted_equals_capacity_path_and_reference(name, impl):
  """Outputs, aux losses, metrics and gradients of the sorted path == the C = S path; the
  output == the per-token loop reference."""
  cfg = make_cfg(name, expert_impl=impl, dropless_windows=())  # the grouped kernel itself
  params = random_params(cfg)
  x, ct = inputs()
  got = loss_and_grads(MoELayer(cfg))(params, x, ct)
  assert_close(got, capacity_result(name))
  r = ROUTERS[name]
  want, _ = ref.moe_layer_reference(
    x,
    jax.tree.map(np.asarray, params),
    router=r["router"],
    num_experts=E,
    k=r["top_k"],
    dropless=True,
    order=r.get("router_order", "softmax_topk"),
    p=r.get("top_p", 0.5),
    activation=r.get("activation", "silu"),
    group_size=8,
  )
  np.testing.assert_allclose(np.asarray(got[0][1][0]), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [None, (2, 4, 1)])
def test_fast_path_windows_equal_the_capacity_path(shape):
  """Dense windows large enough for any load (dropless_windows=(E,)): the layer, one device
  and expert-parallel, == the C = S path (outputs, aux losses, metrics, gradients)."""
  cfg = make_cfg("top_p", dropless_windows=(float(E),))
  got = (
    loss_and_grads(MoELayer(cfg))(random_params(cfg), *inputs())
    if shape is None
    else run_sharded(cfg, shape)
  )
  assert_close(got, capacity_result("top_p"))


def test_cases_exercise_variable_k():
  """Guards the tests' power: null experts and top-p leave tokens with fewer than k real
  experts, so invalid assignments are really skipped."""
  for name, k in (("null_experts", 2), ("top_p", 3)):
    metrics = capacity_result(name)[0][1][1]["metrics"]
    assert 1.0 <= metrics["experts_per_token"] < k - 0.1, name
    assert metrics["dropped_fraction"] == 0.0


def test_route_without_slots_gives_the_same_assignments_and_metrics():
  cfg = make_cfg("top_p")
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, E)) * 3, jnp.float32)
  full = jax.jit(lambda z: route(z, cfg))(logits)
  lean = jax.jit(lambda z: route(z, cfg, slots=False))(logits)
  assert lean.dispatch_index is None and full.dispatch_index.shape == (3, E, 8)
  chex.assert_trees_all_equal(
    (full.expert_index, full.weight, full.valid, full.metrics, full.aux_losses),
    (lean.expert_index, lean.weight, lean.valid, lean.metrics, lean.aux_losses),
  )
  # The slot form of the same decision holds exactly the valid assignments.
  assert int(np.sum(full.slot_valid)) == int(np.sum(lean.valid))


# ------------------------------------------------------------------------------------------
# No [E, S]-sized buffers.
# ------------------------------------------------------------------------------------------

# G = 6 groups of S = 40 tokens, K = 2: S*K = 80, G*S = 240, A = 480 assignments; the fast
# path's main windows hold L = A / E = 60 rows per expert (c_1 = 1), sized by assignments.
HLO_X = (6, 40, D)


def hlo_shapes(cfg: MoEConfig, mesh=None) -> list[tuple[int, ...]]:
  x = jnp.zeros(HLO_X, jnp.float32)
  params = nn.meta.unbox(jax.jit(MoELayer(cfg).init)(jax.random.key(0), x)["params"])
  fn = loss_and_grads(MoELayer(cfg, mesh=mesh))
  text = fn.lower(params, x, x).compile().as_text()
  return [
    tuple(int(n) for n in m.split(",") if n) for m in re.findall(r"[a-z]\d+\[([\d,]*)\]", text)
  ]


def slot_like(shape, s=40, k=2, e=E, g=6):
  """[.., E, C=S ..] slot buffers / [E, G*S, d] expert slot rows / [.., S*K, E] one-hot
  positions. ([G*S, E] logits and their transpose are inherent and allowed.)"""
  pairs = set(zip(shape, shape[1:]))
  triples = set(zip(shape, shape[1:], shape[2:]))
  return bool(pairs & {(e, s), (s * k, e), (g * s * k, e)} or (e, g * s, D) in triples)


def test_dropless_hlo_has_no_slot_buffers():
  cfg = MoEConfig(
    router="topk",
    num_experts=E,
    expert_d_ff=F,
    top_k=2,
    dropless=True,
    group_size=40,
    expert_impl="blocked",
  )
  shapes = hlo_shapes(cfg)
  assert shapes and not [s for s in shapes if slot_like(s)]
  # The test's power: the C = S path it replaces does build them.
  capacity = hlo_shapes(
    MoEConfig(
      router="topk",
      num_experts=E,
      expert_d_ff=F,
      top_k=2,
      dropless=True,
      group_size=40,
      expert_impl="capacity",
    )
  )
  assert [s for s in capacity if slot_like(s)]


# ------------------------------------------------------------------------------------------
# Expert parallelism.
# ------------------------------------------------------------------------------------------


def mesh_of(shape):
  devices = jax.devices()[: int(np.prod(shape))]
  return make_mesh(dict(zip(("data", "expert", "model"), shape)), devices=devices)


def run_sharded(cfg: MoEConfig, shape):
  mesh = mesh_of(shape)
  params = nn.meta.unbox(shard_params(random_params(cfg, boxed=True), mesh))
  return loss_and_grads(MoELayer(cfg, mesh=mesh))(params, *inputs())


@pytest.mark.parametrize(
  # By default: top-k on the expert axis alone; top-p over data, expert and model axes.
  "name,shape",
  covering_params(ROUTERS, MESHES, fast={("topk", (1, 8, 1)), ("top_p", (2, 2, 2))}),
)
def test_sharded_dropless_equals_unsharded(name, shape):
  """Row exchange (padded all_to_all, the CPU fallback) == the unsharded C = S layer:
  outputs, aux losses, metrics (dropped_fraction 0) and gradients."""
  got = run_sharded(make_cfg(name), shape)
  assert_close(got, capacity_result(name))
  assert float(got[0][1][1]["metrics"]["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 1)])
def test_sharded_overflow_loop_equals_unsharded(shape):
  """Main windows of exactly the mean load (c_1 = 1): every device's heavier experts
  overflow into the loop, each device taking its own number of steps (no collective in
  the loop; the model axis' partial sums are reduced after it). Outputs, aux losses,
  metrics and gradients == the unsharded C = S layer."""
  cfg = make_cfg("topk", dropless_windows=(1.0, 1.0625))
  assert_close(run_sharded(cfg, shape), capacity_result("topk"))


def ragged_all_to_all_reference(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, **kw
):
  """``jax.lax.ragged_all_to_all`` as its docstring defines it (the SEND / RECEIVE
  pseudocode), built from all_gather and all_to_all, which XLA:CPU runs: slice i of a
  caller goes to device i // (N / P); a receiver writes the slice from source i // (N / P)
  at the offset the *sender* gave for it (its output_offsets, exchanged by all_to_all),
  recv_sizes[i] rows. The documented precondition send_sizes == all_to_all(recv_sizes)
  is checked: where it fails anywhere, every device's result is poisoned (NaN, or the
  dtype's minimum). Lets the CPU suite run the ragged exchange's offsets and sizes on
  several devices (only the op's GPU/TPU lowering stays untested here)."""
  assert not kw.get("axis_index_groups")
  n = input_offsets.shape[0]
  per = n // jax.lax.axis_size(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)  # [P, rows, ...]: every sender's operand
  # Entry i: what source i // per gave for the slice it sends to me.
  in_off = jax.lax.all_to_all(input_offsets, axis_name, 0, 0, tiled=True)
  out_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  rows = jnp.arange(output.shape[0])
  result = output
  for i in range(n):
    inside = (rows >= out_off[i]) & (rows < out_off[i] + recv_sizes[i])
    take = jnp.clip(in_off[i] + rows - out_off[i], 0, operand.shape[0] - 1)
    received = operands[i // per][take]
    result = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), received, result)
  agree = send_sizes == jax.lax.all_to_all(recv_sizes, axis_name, 0, 0, tiled=True)
  agree = jax.lax.pmin(jnp.all(agree).astype(jnp.int32), axis_name)
  floating = jnp.issubdtype(output.dtype, jnp.floating)
  poison = jnp.nan if floating else jnp.iinfo(output.dtype).min
  return jnp.where(agree > 0, result, jnp.asarray(poison, output.dtype))


def test_ragged_all_to_all_reference_gives_the_documented_example():
  """The example in ``jax.lax.ragged_all_to_all``'s docstring, on 2 devices."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  per_device = dict(
    operand=[[1, 2, 2], [3, 4, 0]],
    output=[[0, 0, 0, 0], [0, 0, 0, 0]],
    input_offsets=[[0, 1], [0, 1]],
    send_sizes=[[1, 2], [1, 1]],
    output_offsets=[[0, 0], [1, 2]],
    recv_sizes=[[1, 1], [2, 1]],
  )
  args = [jnp.asarray(v, jnp.int32).reshape(-1) for v in per_device.values()]
  args = [jax.device_put(a, jax.NamedSharding(mesh, jax.P("x"))) for a in args]
  fn = jax.shard_map(
    functools.partial(ragged_all_to_all_reference, axis_name="x"),
    mesh=mesh,
    in_specs=(jax.P("x"),) * 6,
    out_specs=jax.P("x"),
  )
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), [1, 3, 0, 0, 2, 2, 4, 0])


@pytest.mark.parametrize(
  # By default: top-k on the expert axis alone; top-p over data, expert and model axes.
  "name,shape",
  covering_params(ROUTERS, MESHES, fast={("topk", (1, 8, 1)), ("top_p", (2, 2, 2))}),
)
def test_ragged_exchange_equals_unsharded(name, shape, monkeypatch):
  """ep_exchange='ragged_all_to_all' (the GPU/TPU exchange: only the used rows move) with
  the op replaced by its documented semantics: == the unsharded C = S layer (outputs, aux
  losses, metrics, gradients), nothing dropped."""
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", ragged_all_to_all_reference)
  got = run_sharded(make_cfg(name, ep_exchange="ragged_all_to_all"), shape)
  assert_close(got, capacity_result(name))
  assert float(got[0][1][1]["metrics"]["dropped_fraction"]) == 0.0


def test_rows_per_device_bound():
  cfg = make_cfg("topk", ragged_buffer_factor=1.25, ragged_buffer_min_rows=16)
  assert rows_per_device(2048, 8, cfg) == 320  # ceil(1.25 * 2048 / 8)
  assert rows_per_device(64, 8, cfg) == 16  # the floor
  assert rows_per_device(8, 8, cfg) == 8  # never more than all assignments
  assert rows_per_device(100, 4, make_cfg("topk", ragged_buffer_factor=4.0)) == 100


def expected_overflow(cfg: MoEConfig, params, x, shape):
  """Replays the bounded exchange in numpy: on each token shard, assignments ranked (in
  (group, token, choice) order) >= R among those to one expert device are dropped.
  Returns (y [B, L, d], dropped_fraction)."""
  p = shape[1]
  groups = jnp.asarray(x).reshape(-1, 8, D)
  routing = route(router_logits(groups, params["router"]), cfg, slots=False)
  idx, w, valid = (np.asarray(a) for a in (routing.expert_index, routing.weight, routing.valid))
  g, s, k = idx.shape
  shards = shape[0] * shape[1]
  g_loc = g // shards
  r = rows_per_device(g_loc * s * k, p, cfg)
  e_loc = E // p
  kept = np.zeros_like(valid)
  for dev in range(shards):
    sl = slice(dev * g_loc, (dev + 1) * g_loc)
    dest = (idx[sl] // e_loc).reshape(-1)
    v = valid[sl].reshape(-1)
    seen = np.zeros(p, int)
    keep = np.zeros_like(v)
    for a in range(v.size):
      if v[a]:
        keep[a] = seen[dest[a]] < r
        seen[dest[a]] += 1
    kept[sl] = keep.reshape(g_loc, s, k)
  y = np.zeros(groups.shape)
  gx = np.asarray(groups, np.float64)
  pr = jax.tree.map(np.asarray, params)
  for gi, si, ki in zip(*np.nonzero(kept)):
    e = idx[gi, si, ki]
    y[gi, si] += w[gi, si, ki] * ref.gated_ffn_np(
      gx[gi, si], pr["wi_gate"][e], pr["wi_up"][e], pr["wo"][e], cfg.activation
    )
  dropped = np.mean((valid.sum((1, 2)) - kept.sum((1, 2))) / np.maximum(valid.sum((1, 2)), 1))
  return y.reshape(X_SHAPE), dropped


@pytest.mark.parametrize(
  "shape", [pytest.param((1, 8, 1), marks=pytest.mark.slow), (2, 2, 2)], ids=["1x8x1", "2x2x2"]
)
@pytest.mark.parametrize("exchange", ["padded_all_to_all", "ragged_all_to_all"])
def test_exchange_overflow_is_dropped_and_counted(shape, exchange, monkeypatch):
  """A buffer bound smaller than the routing needs: the overflowing assignments (and only
  they) are dropped, and 'dropped_fraction' counts them exactly; never silent. The ragged
  exchange runs with the op's documented semantics (``ragged_all_to_all_reference``)."""
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", ragged_all_to_all_reference)
  bound = dict(ragged_buffer_factor=0.75, ragged_buffer_min_rows=1, ep_exchange=exchange)
  cfg = make_cfg("topk", **bound)
  params = random_params(cfg)
  x, ct = inputs()
  (_, (y, aux)), _ = run_sharded(cfg, shape)
  want_y, want_dropped = expected_overflow(cfg, params, x, shape)
  assert want_dropped > 0.05  # the bound really binds
  np.testing.assert_allclose(float(aux["metrics"]["dropped_fraction"]), want_dropped, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-5)
  # With a bound that cannot bind, nothing is dropped: the overflow is the bound's doing.
  loose = make_cfg("topk", ragged_buffer_factor=8.0, ep_exchange=exchange)
  (_, (_, aux_ok)), _ = run_sharded(loose, shape)
  assert float(aux_ok["metrics"]["dropped_fraction"]) == 0.0


def test_dropless_ep_hlo_exchanges_rows_not_slots():
  """8 devices: the dropless step's all-to-alls carry [P, R, d] row buffers (R from the
  configured bound), and no slot buffer appears."""
  cfg = make_cfg("topk", ragged_buffer_min_rows=1, ragged_buffer_factor=1.25)
  mesh = mesh_of((1, 8, 1))
  params = nn.meta.unbox(shard_params(random_params(cfg, boxed=True), mesh))
  fn = loss_and_grads(MoELayer(cfg, mesh=mesh))
  text = fn.lower(params, *inputs()).compile().as_text()
  r = rows_per_device(2 * 8 * 2, 8, cfg)  # G_loc = 2 groups of 8 tokens, K = 2
  sizes = [n for dtype, n in all_to_all_elements(text) if dtype == "f32"]
  assert len(sizes) == 4 and all(n == 8 * r * D for n in sizes), sizes


def all_to_all_elements(hlo_text: str) -> list[tuple[str, int]]:
  """(dtype, elements) of each all-to-all's result (XLA:CPU splits it per peer into a
  tuple of [1, ...] pieces, which are summed)."""
  out = []
  for line in hlo_text.splitlines():
    if " all-to-all(" in line:
      result = line.split(" all-to-all(")[0].split("= ", 1)[1]
      shapes = re.findall(r"([a-z]+\d+)\[([\d,]*)\]", result)
      out.append(
        (
          shapes[0][0],
          sum(int(np.prod([int(n) for n in dims.split(",") if n])) for _, dims in shapes),
        )
      )
  return out


# ------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("expert_impl", "foo", r"model\.moe\.expert_impl='foo' is invalid: allowed: \('auto'"),
    ("ep_exchange", "mpi", r"model\.moe\.ep_exchange='mpi' is invalid: allowed"),
    ("expert_block_size", 0, r"model\.moe\.expert_block_size=0 is invalid"),
    ("ragged_buffer_factor", 0.0, r"model\.moe\.ragged_buffer_factor=0\.0 is invalid"),
    ("dropless_windows", (1.5, 1.25), r"model\.moe\.dropless_windows=\(1\.5, 1\.25\) is invalid"),
    ("ragged_buffer_min_rows", 0, r"model\.moe\.ragged_buffer_min_rows=0 is invalid"),
  ],
)
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    MoEConfig.from_config({"dropless": True, field: value}, path="model.moe")


def test_auto_impl_follows_backend():
  cfg = make_cfg("topk")
  want = "ragged_dot" if jax.default_backend() == "tpu" else "blocked"
  assert cfg.resolved_expert_impl() == want and cfg.sorted_dropless
  assert not make_cfg("topk", expert_impl="capacity").sorted_dropless
  assert not MoEConfig(router="topk", dropless=False).sorted_dropless
