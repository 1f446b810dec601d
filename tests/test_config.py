"""Experiment config schema: every configs/*.py loads, validates and builds abstractly;
every invalid value is a ConfigError naming its dotted field."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from moejax.config import (
  DataConfig,
  ExperimentConfig,
  MeshConfig,
  ModelConfig,
  TrainConfig,
  base_config,
  default_train_config,
  with_overrides,
)
from moejax.errors import ConfigError
from moejax.fields import field_names
from moejax.models import Transformer
from moejax.moe_config import MoEConfig
from moejax.parallel import MESH_AXES
from moejax.training.workdir import load_run_config
from tests.helpers import REPO

# ml_collections' config_flags loads config files with the deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

CONFIG_NAMES = sorted(
  os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
)


def load(name: str, *overrides: str) -> ml_collections.ConfigDict:
  """Loads configs/<name>.py exactly as the trainer does (absl config_flags + overrides)."""
  argv = ["prog", f"--config={os.path.join(REPO, 'configs', name + '.py')}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return holder.value


def expected_param_count(m: ModelConfig) -> int:
  """Closed-form parameter count of the Transformer for `m`."""
  d = m.d_model
  n = m.vocab_size * d * (1 if m.tie_embeddings else 2) + d  # embed, lm_head, final norm
  attn = 2 * d * m.num_heads * m.head_dim + 2 * d * m.num_kv_heads * m.head_dim + 2 * d
  if m.attention == "mla":  # q (or q_a, q_norm, q_b), kv_a, kv_norm, kv_b, o; 2 block norms
    h, dqk = m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
    rq, rkv = m.q_lora_rank, m.kv_lora_rank
    attn = (
      ((d * rq + rq + rq * h * dqk) if rq else d * h * dqk)
      + d * (rkv + m.qk_rope_head_dim)
      + rkv
      + rkv * h * (m.qk_nope_head_dim + m.v_head_dim)
      + (h * m.v_head_dim * d)
      + 2 * d
    )
  for i in range(m.num_layers):
    n += attn
    if m.is_moe_layer(i):
      e, f = m.moe.num_experts, m.moe.expert_d_ff
      n += d * m.moe.num_router_logits + 3 * e * d * f + 3 * d * m.moe.num_shared_experts * f
      n += d * m.moe.num_compressed_experts  # compressed-expert vectors
      if m.moe.router == "multigate":  # one gate per task
        n += d * m.moe.num_router_logits * (m.moe.num_tasks - 1)
      if m.moe.router == "pregate":  # no layer router
        n -= d * m.moe.num_router_logits
    else:
      n += 3 * d * m.d_ff
  if m.moe is not None and m.moe.router == "pregate":  # norm, w1 [d, H], w2 [H, M, R]
    h = m.moe.pregate_d_hidden
    n += d + d * h + h * len(m.moe_layers) * m.moe.num_router_logits
  return n


def test_all_expected_config_files_exist():
  assert {"tiny_cpu", "mixtral_like", "deepseek_like", "switch_base", "debug"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_file_loads_validates_and_builds_abstractly(name):
  cfg = load(name)
  model_cfg = ExperimentConfig.from_config(cfg).model
  assert model_cfg == ModelConfig.from_config(cfg.model)
  assert hash(model_cfg) == hash(ModelConfig.from_config(cfg.model))
  tokens = jax.ShapeDtypeStruct((1, cfg.data.seq_len), jnp.int32)
  abstract = jax.eval_shape(Transformer(model_cfg).init, jax.random.key(0), tokens)
  leaves = jax.tree.leaves(nn.meta.unbox(abstract["params"]))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert sum(x.size for x in leaves) == expected_param_count(model_cfg)
  out = jax.eval_shape(
    lambda v, t: Transformer(model_cfg).apply(v, t), nn.meta.unbox(abstract), tokens
  )
  assert out[0].shape == (1, cfg.data.seq_len, model_cfg.vocab_size)
  assert sorted(out[1]["metrics"]) == sorted(f"layers_{i}" for i in model_cfg.moe_layers)


def test_mixtral_like_has_mixtral_8x7b_parameter_count():
  m = ExperimentConfig.from_config(load("mixtral_like")).model
  v, d, layers, e, f = 32000, 4096, 32, 8, 14336
  per_layer = (
    2 * d * 32 * 128
    + 2 * d * 8 * 128  # q, o; k, v (GQA 32/8 heads of 128)
    + 2 * d  # two RMSNorm scales
    + d * e  # router
    + 3 * e * d * f
  )  # experts: w1, w3, w2
  formula = 2 * v * d + d + layers * per_layer
  assert formula == 46_702_792_704  # ~46.7B, the published Mixtral-8x7B size
  abstract = jax.eval_shape(
    Transformer(m).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32)
  )
  assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract))) == formula
  assert m.moe.router_order == "topk_softmax" and m.moe.dropless and m.moe.top_k == 2
  assert m.rope_theta == 1e6 and m.moe_layers == tuple(range(32))


def test_deepseek_like_shape():
  m = ExperimentConfig.from_config(load("deepseek_like")).model
  assert m.moe.router == "shared_experts" and m.moe.num_shared_experts == 2
  assert m.moe.num_experts == 64 and m.moe.top_k == 6
  assert m.moe_layers == tuple(range(1, m.num_layers))  # layer 0 dense


def test_deepseek_like_has_deepseek_v2_lite_parameter_count():
  m = ExperimentConfig.from_config(load("deepseek_like")).model
  v, d, layers, h = 102400, 2048, 27, 16
  attn = (
    d * h * (128 + 64)  # q_proj
    + d * (512 + 64)
    + 512  # kv_a_proj_with_mqa, kv_a_layernorm
    + 512 * h * (128 + 128)  # kv_b_proj
    + h * 128 * d  # o_proj
    + 2 * d
  )  # input / post-attention RMSNorms
  dense_ffn = 3 * d * 10944
  moe_ffn = d * 64 + 3 * 64 * d * 1408 + 3 * d * 2 * 1408  # router, routed, shared
  formula = 2 * v * d + d + layers * attn + dense_ffn + (layers - 1) * moe_ffn
  assert formula == 15_706_484_224  # ~15.7B, the published DeepSeek-V2-Lite size
  abstract = jax.eval_shape(
    Transformer(m).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32)
  )
  assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract))) == formula
  assert m.attention == "mla" and m.q_lora_rank == 0 and m.num_layers == layers


def test_switch_base_shape():
  m = ExperimentConfig.from_config(load("switch_base")).model
  assert m.moe.top_k == 1 and m.moe.capacity_factor == 1.25 and m.moe.activation == "gelu"
  assert 8 <= m.moe.num_experts <= 128
  assert m.moe_layers == tuple(range(1, m.num_layers, 2))


def test_command_line_overrides():
  cfg = load(
    "tiny_cpu",
    "--config.model.moe.num_experts=16",
    "--config.model.moe.group_size=64",
    "--config.train.steps=7",
    "--config.model.dtype=bfloat16",
  )
  m = ExperimentConfig.from_config(cfg).model
  assert m.moe.num_experts == 16 and m.moe.group_size == 64 and m.dtype == "bfloat16"
  assert cfg.train.steps == 7


@pytest.mark.parametrize(
  "moe_every,first,layers,expected",
  [
    (0, 0, 4, ()),
    (1, 0, 4, (0, 1, 2, 3)),
    (2, 1, 6, (1, 3, 5)),
    (2, 0, 5, (0, 2, 4)),
    (3, 2, 9, (2, 5, 8)),
    (1, 3, 4, (3,)),
  ],
)
def test_is_moe_layer(moe_every, first, layers, expected):
  cfg = base_config()
  cfg.model.moe_every, cfg.model.first_moe_layer, cfg.model.num_layers = moe_every, first, layers
  m = ModelConfig.from_config(cfg.model)
  assert m.moe_layers == expected
  assert [m.is_moe_layer(i) for i in range(layers)] == [i in expected for i in range(layers)]
  assert (m.moe is None) == (moe_every == 0)


def test_dense_model_ignores_but_validates_moe_section():
  cfg = base_config()
  cfg.model.moe_every = 0
  assert ExperimentConfig.from_config(cfg).model.moe is None
  cfg.model.moe.top_k = 99
  with pytest.raises(ConfigError, match=r"^model\.moe\.top_k=99"):
    ExperimentConfig.from_config(cfg)
  del cfg.model["moe"]
  cfg.model.moe_every = 0
  assert ExperimentConfig.from_config(cfg).model.moe is None


def test_base_config_and_train_defaults_are_valid():
  assert ExperimentConfig.from_config(base_config()).train == TrainConfig()
  assert TrainConfig.from_config(default_train_config()) == TrainConfig()


# (dotted field to set, value, field the error must name)
INVALID = [
  ("model.d_model", -8, "model.d_model"),
  ("model.num_layers", 0, "model.num_layers"),
  ("model.num_heads", -4, "model.num_heads"),
  ("model.num_kv_heads", 0, "model.num_kv_heads"),
  ("model.head_dim", 31, "model.head_dim"),
  ("model.d_ff", 0, "model.d_ff"),
  ("model.vocab_size", 100, "model.vocab_size"),
  ("model.max_len", -1, "model.max_len"),
  ("model.moe_every", -1, "model.moe_every"),
  ("model.first_moe_layer", 4, "model.first_moe_layer"),
  ("model.rope_theta", -1.0, "model.rope_theta"),
  ("model.rms_norm_eps", 0.0, "model.rms_norm_eps"),
  ("model.dtype", "float64", "model.dtype"),
  ("model.param_dtype", "int8", "model.param_dtype"),
  ("model.tie_embeddings", "yes", "model.tie_embeddings"),
  ("model.num_layers", 2.5, "model.num_layers"),
  ("model.d_modle", 64, "model.d_modle"),
  ("model.moe", None, "model.moe"),
  ("model.moe.top_k", 9, "model.moe.top_k"),
  ("model.moe.num_experts", -2, "model.moe.num_experts"),
  ("model.moe.expert_d_ff", 0, "model.moe.expert_d_ff"),
  ("model.moe.router", "no_such_router", "model.moe.router"),
  ("model.moe.router_order", "random", "model.moe.router_order"),
  ("model.moe.capacity_factor", -1.0, "model.moe.capacity_factor"),
  ("model.moe.topk", 2, "model.moe.topk"),
  ("model.moe.group_size", 3, "model.moe.group_size"),
  ("data.seq_len", 1024, "data.seq_len"),  # > model.max_len = 512
  ("data.seq_len", -3, "data.seq_len"),
  ("data.global_batch_size", 0, "data.global_batch_size"),
  ("data.sequence_length", 64, "data.sequence_length"),
  ("mesh.expert", 0, "mesh.expert"),
  ("mesh.model", -1, "mesh.model"),  # data is already -1
  ("mesh.model", 1.5, "mesh.model"),
  ("mesh.pipeline", 2, "mesh.pipeline"),
  ("train.steps", 0, "train.steps"),
  ("train.learning_rate", 0.0, "train.learning_rate"),
  ("train.learning_rate", float("nan"), "train.learning_rate"),
  ("train.warmup_steps", -1, "train.warmup_steps"),
  ("train.end_lr_ratio", 1.5, "train.end_lr_ratio"),
  ("train.weight_decay", -0.1, "train.weight_decay"),
  ("train.grad_clip_norm", 0.0, "train.grad_clip_norm"),
  ("train.b1", 1.0, "train.b1"),
  ("train.b2", -0.5, "train.b2"),
  ("train.seed", -1, "train.seed"),
  ("train.log_every", 0, "train.log_every"),
  ("train.eval_every", -1, "train.eval_every"),
  ("train.eval_steps", 0, "train.eval_steps"),
  ("train.checkpoint_every", 0, "train.checkpoint_every"),
  ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
  ("train.async_checkpointing", "yes", "train.async_checkpointing"),
  ("train.nan_policy", "ignore", "train.nan_policy"),
  ("train.lr", 1e-3, "train.lr"),
  ("optim", {"lr": 1e-3}, "optim"),
]


@pytest.mark.parametrize("dotted,value,field", INVALID, ids=[f"{d}={v!r}" for d, v, _ in INVALID])
def test_invalid_value_raises_config_error_naming_field(dotted, value, field):
  cfg = with_overrides(load("tiny_cpu"), {dotted: value})
  with pytest.raises(ConfigError) as err:
    ExperimentConfig.from_config(cfg)
  assert str(err.value).startswith(f"{field}="), str(err.value)


def test_heads_not_divisible_by_kv_heads_message():
  cfg = load("tiny_cpu", "--config.model.num_heads=3")
  with pytest.raises(ConfigError) as err:
    ExperimentConfig.from_config(cfg)
  assert str(err.value) == (
    "model.num_heads=3 is invalid: must be divisible by model.num_kv_heads=2"
  )


@pytest.mark.parametrize(
  "section,field", [("train", "seed"), ("train", "nan_policy"), ("mesh", "expert")]
)
def test_missing_required_field(section, field):
  cfg = load("tiny_cpu")
  with cfg.unlocked():
    del cfg[section][field]
  with pytest.raises(ConfigError, match=rf"^{section}\.{field} is missing"):
    ExperimentConfig.from_config(cfg)


def test_missing_section():
  cfg = load("tiny_cpu")
  with cfg.unlocked():
    del cfg["train"]
  with pytest.raises(ConfigError, match=r"^train is missing"):
    ExperimentConfig.from_config(cfg)


def test_group_size_dividing_batch_tokens_is_accepted():
  cfg = load("tiny_cpu", "--config.model.moe.group_size=256")  # 16 * 128 tokens
  assert ExperimentConfig.from_config(cfg).model.moe.group_size == 256


def test_model_config_direct_construction_validates():
  with pytest.raises(ConfigError, match=r"^model\.num_kv_heads=0"):
    ModelConfig(num_kv_heads=0)
  with pytest.raises(ConfigError, match=r"^model\.moe=None"):
    ModelConfig(moe_every=1)


def test_base_config_is_the_dataclass_defaults():
  exp = ExperimentConfig.from_config(base_config())
  assert exp == ExperimentConfig(
    model=ModelConfig(), data=DataConfig(), mesh=MeshConfig(), train=TrainConfig()
  )
  assert ModelConfig.from_config(base_config().model) == ModelConfig()  # dense by default
  moe = ModelConfig.from_config(base_config().model.to_dict() | {"moe_every": 1}).moe
  assert moe == MoEConfig()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_experiment_config_round_trips_through_its_config_dict(name):
  exp = ExperimentConfig.from_config(load(name))
  again = ExperimentConfig.from_config(exp.to_config_dict())
  assert again == exp and hash(again.model) == hash(exp.model)
  assert ExperimentConfig.from_config(exp) is exp  # parsed once: an instance passes through


@pytest.mark.parametrize(
  "section,cls", [("data", DataConfig), ("mesh", MeshConfig), ("train", TrainConfig)]
)
def test_unknown_field_error_lists_the_allowed_fields(section, cls):
  cfg = load("tiny_cpu")
  with cfg.unlocked():
    cfg[section]["no_such_field"] = 1
  with pytest.raises(ConfigError) as err:
    ExperimentConfig.from_config(cfg)
  allowed = sorted(f.name for f in dataclasses.fields(cls) if f.name != "config_path")
  assert str(err.value) == (
    f"{section}.no_such_field=1 is invalid: unknown field; allowed fields are {allowed}"
  )


def test_section_dataclasses_validate_on_direct_construction():
  with pytest.raises(ConfigError, match=r"^train\.steps=0 is invalid"):
    TrainConfig(steps=0)
  with pytest.raises(ConfigError, match=r"^data\.seq_len=-1 is invalid"):
    DataConfig(seq_len=-1)
  with pytest.raises(ConfigError, match=r"^mesh\.model=-1 is invalid: only one mesh axis"):
    MeshConfig(data=-1, model=-1)


def test_old_run_config_missing_new_fields_loads_with_defaults(tmp_path):
  cfg = load("tiny_cpu").to_dict()
  del cfg["train"]["nan_policy"]  # a run written before the field existed
  del cfg["data"]["shuffle"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  exp = ExperimentConfig.from_config(load_run_config(str(tmp_path)))
  assert exp.train.nan_policy == TrainConfig().nan_policy
  assert exp.data.shuffle == DataConfig().shuffle
  assert exp.model == ModelConfig.from_config(load("tiny_cpu").model)


def test_with_overrides_copies_and_sets_dotted_fields():
  cfg = load("tiny_cpu")
  new = with_overrides(cfg, {"mesh.expert": 2, "model.moe.top_k": 1, "data.data_dir": "/d"})
  assert (new.mesh.expert, new.model.moe.top_k, new.data.data_dir) == (2, 1, "/d")
  assert (cfg.mesh.expert, cfg.model.moe.top_k, cfg.data.data_dir) == (1, 2, None)


def test_mesh_config_fields_are_the_mesh_axes():
  assert tuple(field_names(MeshConfig)) == MESH_AXES  # one field per axis, in mesh order
  assert MeshConfig.from_config(base_config().mesh).sizes() == {"data": -1, "expert": 1, "model": 1}


def test_replace_fields_returns_a_new_validated_config_naming_bad_fields():
  exp = ExperimentConfig.from_config(load("tiny_cpu"))
  new = exp.replace_fields({"model.moe.num_experts": 2, "mesh.expert": 2, "data.data_dir": "/d"})
  assert (new.model.moe.num_experts, new.mesh.expert, new.data.data_dir) == (2, 2, "/d")
  assert new == dataclasses.replace(
    exp,
    model=dataclasses.replace(exp.model, moe=dataclasses.replace(exp.model.moe, num_experts=2)),
    mesh=dataclasses.replace(exp.mesh, expert=2),
    data=dataclasses.replace(exp.data, data_dir="/d"),
  )
  dense = exp.replace_fields({"model.moe_every": 0})
  assert dense.model.moe is None
  # a dense model's absent moe section starts from MoEConfig's defaults
  moe = dense.replace_fields({"model.moe_every": 1, "model.moe.top_k": 1}).model.moe
  assert moe == dataclasses.replace(MoEConfig(), top_k=1, config_path="model.moe")
  for fields, match in (
    ({"model.moe.top_kk": 1}, r"model\.moe\.top_kk=1 is invalid: unknown field"),
    ({"model.d_model.x": 1}, r"model\.d_model\.x=1 is invalid: model\.d_model=128 is not a config"),
    ({"mesh.expert": 0}, r"mesh\.expert=0 is invalid"),
    ({"data.seq_len": 10**6}, r"data\.seq_len=1000000 is invalid: must be <= model\.max_len"),
  ):
    with pytest.raises(ConfigError, match=match):
      exp.replace_fields(fields)
