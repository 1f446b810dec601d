"""The experiment config schema: ``ModelConfig``, the ``train`` section and whole-config checks.

An experiment is one ``ml_collections.ConfigDict`` with four sections (see ``configs/``):

  model  -> ``ModelConfig`` (plus ``model.moe`` -> ``moejax.moe_config.MoEConfig``)
  data   -> ``moejax.data.resolve_data_config``
  mesh   -> {data, expert, model}: ints >= 1, or -1 for "all remaining devices"
  train  -> optimizer, schedule, logging, checkpointing (``default_train_config()``)

``validate_config`` checks all of it in plain Python before anything is traced or
compiled; every error is a ``moejax.errors.ConfigError`` whose message names the dotted
field (``model.num_heads=3 is invalid: must be divisible by model.num_kv_heads=2``).
Device-count checks are left to ``moejax.parallel.mesh.make_mesh``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from moejax.errors import ConfigError, config_error
from moejax.moe_config import MoEConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("gqa", "mla")
NAN_POLICIES = ("stop", "skip")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "blockwise")
REMAT_POLICIES = ("auto", "none", "full", "minimal", "save_a2a")
# train fields added after runs were written: a config.json without them still loads.
OPTIONAL_TRAIN_FIELDS = ("fsdp", "microbatches")
SECTIONS = ("model", "data", "mesh", "train")
MESH_AXES = ("data", "expert", "model")  # == moejax.parallel.mesh.MESH_AXES


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v)))


def _as_dict(cfg: Any) -> dict[str, Any]:
  """Top-level items of a ConfigDict / mapping, sub-dicts left as they are."""
  if isinstance(cfg, ml_collections.ConfigDict):
    return {k: cfg[k] for k in cfg.keys()}
  return dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)


def _reject_unknown(values: dict[str, Any], known, path: str) -> None:
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise config_error(f"{path}.{unknown[0]}", values[unknown[0]],
                       f"unknown field; allowed fields are {sorted(known)}")


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the decoder-only transformer (frozen and hashable, so Flax
  modules and jitted functions can hold it as a static attribute).

  Attributes:
    vocab_size: V, rows of the embedding / columns of the LM head (259 = byte tokenizer).
    d_model: d, width of the residual stream.
    num_layers: number of transformer blocks.
    num_heads: H, query heads.
    num_kv_heads: H_kv, key/value heads (grouped-query attention, Ainslie et al., 2023);
      H must be a multiple of H_kv; H_kv = H is multi-head, H_kv = 1 multi-query attention.
    head_dim: D_h, width of one attention head (need not equal d / H).
    attention: 'gqa' (grouped-query attention, ``moejax.models.attention``) or 'mla'
      (DeepSeek-V2 Multi-head Latent Attention, ``moejax.models.mla``; Liu et al., 2024).
      MLA uses the five fields below instead of num_kv_heads / head_dim, which it ignores.
    q_lora_rank: MLA only. r_q, rank of the low-rank query path x -> c_q -> q; 0 projects
      queries directly from x (DeepSeek-V2-Lite).
    kv_lora_rank: MLA only. r_kv, width of the compressed key/value latent c_kv.
    qk_nope_head_dim: MLA only. D_n, per-head query/key dims without position encoding.
    qk_rope_head_dim: MLA only. D_r, per-head query dims (and the one key shared by all
      heads) carrying interleaved RoPE; even. Scores are scaled by (D_n + D_r)^-1/2.
    v_head_dim: MLA only. D_v, per-head value width.
    d_ff: hidden width of the dense (non-MoE) gated FFN layers.
    moe_every: 0 for a dense model; else every ``moe_every``-th layer, counting from
      ``first_moe_layer``, is a MoE layer (see ``is_moe_layer``).
    first_moe_layer: index of the first MoE layer (DeepSeekMoE keeps layer 0 dense).
    rope_theta: RoPE base (Su et al., 2021); 1e4 Llama-2, 1e6 Mixtral.
    rms_norm_eps: epsilon of RMSNorm (Zhang & Sennrich, 2019).
    tie_embeddings: reuse the embedding matrix as the LM head (Press & Wolf, 2017).
    dtype: compute dtype of matmuls; norms, softmax and logits are always float32.
    param_dtype: storage dtype of the parameters.
    max_len: the longest sequence the model is configured for (checked against
      ``data.seq_len``; RoPE itself has no table, so nothing is allocated for it).
    remat: rematerialise each block in the backward pass (``nn.remat``); the same as
      remat_policy='full' (kept so that configs written before remat_policy load).
    remat_policy: what the backward keeps of each block's forward
      (``moejax.models.remat``): 'none', 'full' (recompute everything), 'minimal' (keep
      the projections' outputs), 'save_a2a' (keep the expert-parallel all_to_all
      results, so the backward does not exchange again); 'auto' = 'full' if remat else
      'none'.
    scan_layers: run the blocks with ``nn.scan`` over their repeating unit, parameters
      stacked on a leading 'layers' axis (``moejax.models.layer_stack``): compile time
      independent of depth.
    attention_impl: the attention kernel (``moejax.models.attention_impl``): 'reference'
      (materialises [B, H, L, L]), 'xla' / 'cudnn' (``jax.nn.dot_product_attention``),
      'blockwise' (online softmax over key blocks, O(L * block) memory); 'auto' picks
      cudnn on GPU and blockwise elsewhere for long sequences, reference for short ones.
    moe: the MoE layer config; None for a dense model. ``from_config`` drops a given
      ``moe`` section to None when ``moe_every == 0`` (after validating it), so a dense
      model never constrains the mesh through it.
    config_path: dotted path used in error messages; not part of equality.
  """

  vocab_size: int = 259
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  attention: str = "gqa"
  q_lora_rank: int = 0
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  d_ff: int = 256
  moe_every: int = 0
  first_moe_layer: int = 0
  rope_theta: float = 1e4
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  max_len: int = 2048
  remat: bool = False
  remat_policy: str = "auto"
  scan_layers: bool = False
  attention_impl: str = "auto"
  moe: MoEConfig | None = None
  config_path: str = dataclasses.field(default="model", compare=False, hash=False, repr=False)

  def __post_init__(self):
    validate_model_config(self)

  @classmethod
  def from_config(cls, cd: Any, path: str = "model") -> "ModelConfig":
    """Builds a validated ModelConfig from a ConfigDict/mapping; unknown keys are errors.

    The ``moe`` sub-dict (may be absent or None for a dense model) becomes a MoEConfig via
    ``MoEConfig.from_config(cd.moe, path=f'{path}.moe')``.
    """
    values = _as_dict(cd)
    known = {f.name for f in dataclasses.fields(cls)} - {"config_path"}
    _reject_unknown(values, known, path)
    moe = values.pop("moe", None)
    if moe is not None and not isinstance(moe, MoEConfig):
      if not hasattr(moe, "items"):
        raise config_error(f"{path}.moe", moe, "must be a config section (dict) or None")
      moe = MoEConfig.from_config(moe, path=f"{path}.moe")
    if values.get("moe_every", cls.moe_every) == 0:
      moe = None  # dense model: a leftover moe section is validated, then ignored
    return cls(**values, moe=moe, config_path=path)

  def is_moe_layer(self, i: int) -> bool:
    """Layer i is MoE iff moe_every > 0, i >= first_moe_layer and
    (i - first_moe_layer) % moe_every == 0."""
    return (self.moe_every > 0 and i >= self.first_moe_layer
            and (i - self.first_moe_layer) % self.moe_every == 0)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def num_groups(self) -> int:
    """G = num_heads / num_kv_heads, query heads sharing one key/value head."""
    return self.num_heads // self.num_kv_heads

  @property
  def remat_mode(self) -> str:
    """The effective remat policy: remat_policy, with 'auto' -> 'full' iff remat."""
    if self.remat_policy == "auto":
      return "full" if self.remat else "none"
    return self.remat_policy


def _check(cfg: ModelConfig, name: str, ok: bool, allowed: str) -> None:
  if not ok:
    raise config_error(f"{cfg.config_path}.{name}", getattr(cfg, name), allowed)


def validate_model_config(cfg: ModelConfig) -> None:
  """Raises ConfigError naming the first invalid field of `cfg`."""
  p = cfg.config_path
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "d_ff", "max_len"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_int(v) and v >= 1, "must be an int >= 1")
  _check(cfg, "num_heads", cfg.num_heads % cfg.num_kv_heads == 0,
         f"must be divisible by {p}.num_kv_heads={cfg.num_kv_heads}")
  _check(cfg, "head_dim", cfg.head_dim % 2 == 0,
         "must be even (rotary embeddings rotate pairs of dimensions)")
  _check(cfg, "attention", cfg.attention in ATTENTIONS, f"allowed: {ATTENTIONS}")
  # The MLA fields are checked whatever the attention (their defaults are valid).
  _check(cfg, "q_lora_rank", _is_int(cfg.q_lora_rank) and cfg.q_lora_rank >= 0,
         "must be an int >= 0 (0 = MLA queries projected directly from the residual stream)")
  for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_int(v) and v >= 1, "must be an int >= 1")
  _check(cfg, "qk_rope_head_dim", cfg.qk_rope_head_dim % 2 == 0,
         "must be even (rotary embeddings rotate pairs of dimensions)")
  _check(cfg, "moe_every", _is_int(cfg.moe_every) and cfg.moe_every >= 0,
         "must be an int >= 0 (0 = dense model)")
  _check(cfg, "first_moe_layer", _is_int(cfg.first_moe_layer) and cfg.first_moe_layer >= 0,
         "must be an int >= 0")
  if cfg.moe_every > 0:
    _check(cfg, "first_moe_layer", cfg.first_moe_layer < cfg.num_layers,
           f"must be < {p}.num_layers={cfg.num_layers} when {p}.moe_every > 0")
    _check(cfg, "moe", isinstance(cfg.moe, MoEConfig),
           f"a MoE section is required when {p}.moe_every={cfg.moe_every} > 0")
  else:
    _check(cfg, "moe", cfg.moe is None or isinstance(cfg.moe, MoEConfig),
           "must be a MoE section or None")
  _check(cfg, "rope_theta", _is_number(cfg.rope_theta) and cfg.rope_theta > 0,
         "must be a finite number > 0")
  _check(cfg, "rms_norm_eps", _is_number(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0,
         "must be a finite number > 0")
  _check(cfg, "remat_policy", cfg.remat_policy in REMAT_POLICIES, f"allowed: {REMAT_POLICIES}")
  _check(cfg, "attention_impl", cfg.attention_impl in ATTENTION_IMPLS,
         f"allowed: {ATTENTION_IMPLS}")
  for name in ("tie_embeddings", "remat", "scan_layers"):
    _check(cfg, name, isinstance(getattr(cfg, name), (bool, np.bool_)), "must be a bool")
  for name in ("dtype", "param_dtype"):
    _check(cfg, name, getattr(cfg, name) in DTYPES, f"allowed: {DTYPES}")


# ----------------------------------------------------------------------------- sections


def default_model_config() -> ml_collections.ConfigDict:
  """The ``model`` section with its defaults (a small MoE model) and a ``moe`` sub-section."""
  defaults = ModelConfig()
  cd = ml_collections.ConfigDict()
  for f in dataclasses.fields(ModelConfig):
    if f.name not in ("moe", "config_path"):
      cd[f.name] = getattr(defaults, f.name)
  cd.moe_every = 2
  cd.first_moe_layer = 1
  cd.moe = default_moe_config()
  return cd


def default_moe_config() -> ml_collections.ConfigDict:
  """The ``model.moe`` section with ``MoEConfig``'s defaults."""
  defaults = MoEConfig()
  cd = ml_collections.ConfigDict()
  for f in dataclasses.fields(MoEConfig):
    if f.name == "config_path":
      continue
    if f.name == "group_size":  # typed, so --config.model.moe.group_size=64 parses as int
      cd.group_size = ml_collections.FieldReference(None, field_type=int)
    else:
      cd[f.name] = getattr(defaults, f.name)
  return cd


def default_mesh_config() -> ml_collections.ConfigDict:
  """All devices on the data axis."""
  return ml_collections.ConfigDict({"data": -1, "expert": 1, "model": 1})


def default_train_config() -> ml_collections.ConfigDict:
  """The ``train`` section with its defaults (every field is required by validation)."""
  return ml_collections.ConfigDict({
      "steps": 1000,
      "learning_rate": 1e-3,  # peak of linear warmup + cosine decay
      "warmup_steps": 100,
      "end_lr_ratio": 0.1,  # final lr = learning_rate * end_lr_ratio
      "weight_decay": 0.1,  # AdamW, decoupled
      "grad_clip_norm": 1.0,  # global-norm clipping
      "b1": 0.9,
      "b2": 0.95,
      "seed": 0,  # parameter init
      "log_every": 10,
      "eval_every": 100,  # 0 = never
      "eval_steps": 10,
      "checkpoint_every": 100,
      "keep_checkpoints": 3,
      "async_checkpointing": True,
      "nan_policy": "stop",  # 'stop' or 'skip' the update of a non-finite step
      "fsdp": False,  # shard params / grads / optimizer state over 'data' (ZeRO-3)
      "microbatches": 1,  # gradient accumulation: the batch is split into this many
  })


def base_config() -> ml_collections.ConfigDict:
  """A complete, valid experiment config that ``configs/*.py`` start from."""
  from moejax.data import default_data_config  # local: keeps tf/tfds off the model path

  cfg = ml_collections.ConfigDict()
  cfg.model = default_model_config()
  cfg.data = default_data_config()
  cfg.mesh = default_mesh_config()
  cfg.train = default_train_config()
  return cfg


# ----------------------------------------------------------------------------- validation


def _validate_mesh(mesh_cfg: Any, path: str = "mesh") -> None:
  """Types only (the device count is checked by ``make_mesh``): each axis an int >= 1 or
  -1, at most one -1, no unknown axes."""
  values = _as_dict(mesh_cfg)
  unknown = sorted(set(values) - set(MESH_AXES))
  if unknown:
    raise config_error(f"{path}.{unknown[0]}", values[unknown[0]],
                       f"unknown mesh axis; allowed axes are {list(MESH_AXES)}")
  fill = None
  for name in MESH_AXES:
    if name not in values:
      raise ConfigError(f"{path}.{name} is missing: the mesh needs int sizes for "
                        f"{list(MESH_AXES)} (one of them may be -1)")
    v = values[name]
    if not _is_int(v) or not (v >= 1 or v == -1):
      raise config_error(f"{path}.{name}", v,
                         "must be an int >= 1, or -1 to use all remaining devices")
    if v == -1:
      if fill is not None:
        raise config_error(f"{path}.{name}", v,
                           f"only one mesh axis may be -1 and {path}.{fill} is already -1")
      fill = name


def _train_checks() -> dict[str, tuple[Any, str]]:
  """field -> (predicate, allowed text)."""
  pos_int = (lambda v: _is_int(v) and v > 0, "must be an int > 0")
  nonneg_int = (lambda v: _is_int(v) and v >= 0, "must be an int >= 0")
  unit = (lambda v: _is_number(v) and 0 <= v < 1, "must be a number in [0, 1)")
  return {
      "steps": pos_int,
      "learning_rate": (lambda v: _is_number(v) and v > 0, "must be a finite number > 0"),
      "warmup_steps": nonneg_int,
      "end_lr_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "must be a number in [0, 1]"),
      "weight_decay": (lambda v: _is_number(v) and v >= 0, "must be a finite number >= 0"),
      "grad_clip_norm": (lambda v: _is_number(v) and v > 0, "must be a finite number > 0"),
      "b1": unit,
      "b2": unit,
      "seed": nonneg_int,
      "log_every": pos_int,
      "eval_every": (nonneg_int[0], "must be an int >= 0 (0 = never)"),
      "eval_steps": pos_int,
      "checkpoint_every": pos_int,
      "keep_checkpoints": pos_int,
      "async_checkpointing": (lambda v: isinstance(v, (bool, np.bool_)), "must be a bool"),
      "nan_policy": (lambda v: v in NAN_POLICIES, f"allowed: {NAN_POLICIES}"),
      "fsdp": (lambda v: isinstance(v, (bool, np.bool_)), "must be a bool"),
      "microbatches": (pos_int[0], "must be an int > 0 dividing the per-step batch "
                       "(1 = no gradient accumulation)"),
  }


def validate_train_config(train_cfg: Any, path: str = "train") -> None:
  """Every field of ``default_train_config()`` is required and checked; unknown fields are
  errors."""
  values = _as_dict(train_cfg)
  checks = _train_checks()
  _reject_unknown(values, checks, path)
  for name, (ok, allowed) in checks.items():
    if name not in values and name in OPTIONAL_TRAIN_FIELDS:
      continue  # a config written before the field existed: its default applies
    if name not in values:
      raise ConfigError(f"{path}.{name} is missing: {allowed} "
                        f"(default {default_train_config()[name]!r})")
    if not ok(values[name]):
      raise config_error(f"{path}.{name}", values[name], allowed)


def validate_config(config: Any) -> ModelConfig:
  """Validates a whole experiment config before anything is compiled.

  Checks each section (unknown sections and fields are errors) and the cross-section
  constraints:
    data.seq_len <= model.max_len;
    model.vocab_size >= 259 (the byte tokenizer's ids must index the embedding);
    data.global_batch_size * data.seq_len % model.moe.group_size == 0 for a MoE model
      with a group size (the MoE layer splits the batch's tokens into whole groups).
  Returns the ModelConfig. Raises ConfigError naming the field.
  """
  from moejax.data import VOCAB_SIZE, resolve_data_config

  sections = _as_dict(config)
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    value = sections[unknown[0]]
    value = value.to_dict() if hasattr(value, "to_dict") else value
    raise config_error(unknown[0], value,
                       f"unknown config section; allowed sections are {list(SECTIONS)}")
  for name in SECTIONS:
    if name not in sections or sections[name] is None:
      raise ConfigError(f"{name} is missing: an experiment config needs the sections "
                        f"{list(SECTIONS)} (start from moejax.config.base_config())")
  model = ModelConfig.from_config(sections["model"], path="model")
  data = resolve_data_config(sections["data"], path="data")
  _validate_mesh(sections["mesh"], path="mesh")
  validate_train_config(sections["train"], path="train")

  if data["seq_len"] > model.max_len:
    raise config_error("data.seq_len", data["seq_len"],
                       f"must be <= model.max_len={model.max_len}")
  if model.vocab_size < VOCAB_SIZE:
    raise config_error("model.vocab_size", model.vocab_size,
                       f"must be >= {VOCAB_SIZE}, the byte tokenizer's vocabulary size")
  microbatches = sections["train"].get("microbatches", 1)
  if data["global_batch_size"] % microbatches:
    raise config_error("train.microbatches", microbatches,
                       f"must divide data.global_batch_size={data['global_batch_size']}")
  if model.moe is not None and model.moe.group_size is not None:
    tokens = data["global_batch_size"] * data["seq_len"]
    if tokens % model.moe.group_size:
      raise config_error("model.moe.group_size", model.moe.group_size,
                         f"must divide the tokens of a batch, data.global_batch_size * "
                         f"data.seq_len = {data['global_batch_size']} * {data['seq_len']} = "
                         f"{tokens}")
  return model
