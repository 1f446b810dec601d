"""Shared test builders: MoE layer configs, random parameters, a tiny experiment config."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.convert.safetensors_io import read_safetensors
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.training.workdir import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a subprocess: the session's fast-compile flags (tests/conftest.py) with
  the simulated device count set to `devices` (None: the one real CPU device)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def make_moe_cfg(
  router: str = "topk", num_experts: int = 4, expert_d_ff: int = 8, **kw
) -> MoEConfig:
  """A small MoEConfig; routers that need extra experts get one/two by default."""
  if router == "null_experts":
    kw.setdefault("num_null_experts", 2)
  if router == "shared_experts":
    kw.setdefault("num_shared_experts", 1)
  return MoEConfig(router=router, num_experts=num_experts, expert_d_ff=expert_d_ff, **kw)


def random_like(params, seed: int, router_scale: float = 1.0):
  """Every leaf of an (unboxed or boxed) tree replaced by N(0, 1/fan_in) draws, fan_in =
  shape[-2]; router weights `router_scale` x larger (clear routing margins, no near-ties)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    scale = router_scale if "router" in jax.tree_util.keystr(path) else 1.0
    fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1  # 1-D: DeepSeek-V3's router_bias [E]
    value = rng.standard_normal(leaf.shape) * scale / np.sqrt(fan_in)
    return jnp.asarray(value, leaf.dtype)

  values = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(params))
  return nn.meta.replace_boxed(params, values)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_model(cfg: ModelConfig, rng: jax.Array, shape: tuple[int, int]):
  return nn.meta.unbox(Transformer(cfg).init(rng, jnp.zeros(shape, jnp.int32))["params"])


def init_model_params(cfg: ModelConfig, seed: int = 0, shape: tuple[int, int] = (1, 8)):
  """The Transformer's own (jitted) init, unboxed; `shape` [B, L] of the init tokens must
  tile the MoE routing groups (``moe.group_size``)."""
  return _init_model(cfg, jax.random.key(seed), shape)


def load_config(name: str):
  """configs/<name>.py's get_config()."""
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def tiny_config(
  data_dir: str,
  steps: int = 8,
  learning_rate: float = 1e-3,
  checkpoint_every: int = 4,
  mesh=(1, 1, 1),
  router: str = "topk",
  eval_every: int | None = None,
  **moe,
):
  """configs/tiny_cpu.py shrunk so a few steps compile and run in seconds (one eval at the
  end unless `eval_every` says otherwise; 0: none, one compile less)."""
  cfg = load_config("tiny_cpu")
  with cfg.unlocked():
    cfg.model.d_model = 32
    cfg.model.num_layers = 2
    cfg.model.num_heads = 2
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 16
    cfg.model.d_ff = 64
    cfg.model.moe_every = 1
    cfg.model.first_moe_layer = 1
    cfg.model.moe.num_experts = 4
    cfg.model.moe.expert_d_ff = 32
    cfg.model.moe.top_k = 2
    cfg.model.moe.router = router
    for k, v in moe.items():
      cfg.model.moe[k] = v
    cfg.data.data_dir = data_dir
    cfg.data.seq_len = 32
    cfg.data.global_batch_size = 8
    cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = mesh
    cfg.train.steps = steps
    cfg.train.learning_rate = learning_rate
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 1
    cfg.train.eval_every = steps if eval_every is None else eval_every
    cfg.train.eval_steps = 2
    cfg.train.checkpoint_every = checkpoint_every
    cfg.train.keep_checkpoints = 3
  return cfg


# The same tiny model as `tiny_config`, as trainer command-line overrides of tiny_cpu.py.
TINY_FLAGS = [
  "--config.model.d_model=32",
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=2",
  "--config.model.head_dim=16",
  "--config.model.d_ff=64",
  "--config.model.moe.num_experts=4",
  "--config.model.moe.expert_d_ff=32",
  "--config.data.seq_len=32",
  "--config.data.global_batch_size=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
]


def assert_same_safetensors(dir_a, dir_b) -> None:
  """Two HF checkpoint directories hold the same tensor names, dtypes and bits."""
  a, b = read_safetensors(str(dir_a)), read_safetensors(str(dir_b))
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def covering_params(names, shapes, id_of=lambda s: "x".join(map(str, s)), fast=None):
  """(name, shape) pytest params for the full matrix; only a covering diagonal (name i with
  shape i mod len(shapes), so every name and every shape appears) runs by default, the rest
  under ``-m slow``. Keeps each property checked for every router and every mesh in the
  default suite at len(names) compilations instead of len(names) * len(shapes). ``fast``:
  the (name, shape) pairs to run by default instead of the diagonal."""
  import pytest

  names, shapes = list(names), list(shapes)
  if fast is None:
    fast = {(n, shapes[i % len(shapes)]) for i, n in enumerate(names)}
    fast |= {(names[i % len(names)], s) for i, s in enumerate(shapes)}
  fast = set(fast)
  return [
    pytest.param(n, s, id=f"{n}-{id_of(s)}", marks=() if (n, s) in fast else pytest.mark.slow)
    for n in names
    for s in shapes
  ]
