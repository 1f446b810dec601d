"""The experiment config: one frozen, validated dataclass per section, parsed once at the edge.

  ExperimentConfig.from_config(cd)   cd: the ``ml_collections.ConfigDict`` of ``configs/*.py``
    .model  ModelConfig   (.moe: ``moejax.moe_config.MoEConfig`` or None for a dense model)
    .data   DataConfig
    .mesh   MeshConfig    {data, expert, model}: ints >= 1, or -1 for "all remaining devices"
    .train  TrainConfig   optimizer, schedule, logging, checkpointing

Every error is a ``moejax.errors.ConfigError`` naming the dotted field
(``model.num_heads=3 is invalid: must be divisible by model.num_kv_heads=2``). Adding a
field is one line in its dataclass plus one check. Device-count checks are left to
``moejax.parallel.mesh.make_mesh``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from moejax.errors import ConfigError, config_error
from moejax.fields import (
  as_dict,
  check,
  field_names,
  is_bool,
  is_int,
  is_number,
  reject_unknown,
  section_from_config,
  to_config_dict,
)
from moejax.moe_config import MoEConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("gqa", "mla")
NAN_POLICIES = ("stop", "skip")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "blockwise")
REMAT_POLICIES = ("auto", "none", "full", "minimal", "save_a2a")
SECTIONS = ("model", "data", "mesh", "train")
_is_int, _is_number, _check = is_int, is_number, check


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
    rope_scaling: 'none' or 'yarn' (MLA only; Peng et al., 2023, as transformers'
      DeepSeek-V2/V3: ``moejax.models.rope.yarn_rope_angles``). The rope_* fields below
      are used only with 'yarn'.
    rope_factor: s >= 1, the context extension factor.
    rope_original_max_len: the pre-training context L the frequency ramp is measured on.
    rope_beta_fast, rope_beta_slow: pairs making more than beta_fast rotations over L keep
      their frequency, fewer than beta_slow are interpolated by 1/s; beta_fast > beta_slow > 0.
    rope_mscale, rope_mscale_all_dim: cos/sin are multiplied by mscale(s, rope_mscale) /
      mscale(s, rope_mscale_all_dim) (mscale(s) if either is 0), and the MLA softmax scale by
      mscale(s, rope_mscale_all_dim)^2 when rope_mscale_all_dim != 0;
      mscale(s, m) = 0.1 m ln s + 1.
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
    qk_norm: GQA only. 'none'; 'head' (RMSNorm of each query/key head over D_h before
      RoPE; Qwen3) or 'projection' (RMSNorm over the whole q / k projection width H*D_h /
      H_kv*D_h; OLMoE). Scales ``attn/{q,k}_norm/scale``.
    clip_qkv: GQA only. None, or c > 0: q, k, v clamped to [-c, c] after the q/k norm
      (OLMoE, OLMo's ``clip_qkv``).
    attention_bias: GQA only. Biases on the q, k, v projections (Qwen2 / Qwen2-MoE).
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
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 1.0
  rope_mscale_all_dim: float = 0.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  max_len: int = 2048
  remat: bool = False
  remat_policy: str = "auto"
  scan_layers: bool = False
  attention_impl: str = "auto"
  qk_norm: str = "none"
  clip_qkv: float | None = None
  attention_bias: bool = False
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
    if isinstance(cd, cls):
      return cd
    values = as_dict(cd)
    reject_unknown(values, field_names(cls), path)
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
    return (
      self.moe_every > 0
      and i >= self.first_moe_layer
      and (i - self.first_moe_layer) % self.moe_every == 0
    )

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


QK_NORMS = ("none", "head", "projection")


ROPE_SCALINGS = ("none", "yarn")


def _check_rope_scaling(cfg: "ModelConfig") -> None:
  """The YaRN fields (checked whatever rope_scaling, their defaults being valid)."""
  _check(cfg, "rope_scaling", cfg.rope_scaling in ROPE_SCALINGS, f"allowed: {ROPE_SCALINGS}")
  if cfg.rope_scaling == "yarn":
    _check(
      cfg,
      "rope_scaling",
      cfg.attention == "mla",
      f"'yarn' is implemented for attention='mla' only (got {cfg.attention!r})",
    )
  _check(cfg, "rope_factor", _is_number(cfg.rope_factor) and cfg.rope_factor >= 1, "must be >= 1")
  _check(
    cfg,
    "rope_original_max_len",
    _is_int(cfg.rope_original_max_len) and cfg.rope_original_max_len >= 1,
    "must be an int >= 1",
  )
  _check(
    cfg,
    "rope_beta_slow",
    _is_number(cfg.rope_beta_slow) and cfg.rope_beta_slow > 0,
    "must be a finite number > 0",
  )
  _check(
    cfg,
    "rope_beta_fast",
    _is_number(cfg.rope_beta_fast) and cfg.rope_beta_fast > cfg.rope_beta_slow,
    f"must be a finite number > rope_beta_slow={cfg.rope_beta_slow}",
  )
  for name in ("rope_mscale", "rope_mscale_all_dim"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_number(v) and v >= 0, "must be a finite number >= 0 (0 = unused)")


def validate_model_config(cfg: ModelConfig) -> None:
  """Raises ConfigError naming the first invalid field of `cfg`."""
  p = cfg.config_path
  for name in (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "d_ff",
    "max_len",
  ):
    v = getattr(cfg, name)
    _check(cfg, name, _is_int(v) and v >= 1, "must be an int >= 1")
  _check(
    cfg,
    "num_heads",
    cfg.num_heads % cfg.num_kv_heads == 0,
    f"must be divisible by {p}.num_kv_heads={cfg.num_kv_heads}",
  )
  _check(
    cfg,
    "head_dim",
    cfg.head_dim % 2 == 0,
    "must be even (rotary embeddings rotate pairs of dimensions)",
  )
  _check(cfg, "attention", cfg.attention in ATTENTIONS, f"allowed: {ATTENTIONS}")
  # The MLA fields are checked whatever the attention (their defaults are valid).
  _check(
    cfg,
    "q_lora_rank",
    _is_int(cfg.q_lora_rank) and cfg.q_lora_rank >= 0,
    "must be an int >= 0 (0 = MLA queries projected directly from the residual stream)",
  )
  for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    v = getattr(cfg, name)
    _check(cfg, name, _is_int(v) and v >= 1, "must be an int >= 1")
  _check(
    cfg,
    "qk_rope_head_dim",
    cfg.qk_rope_head_dim % 2 == 0,
    "must be even (rotary embeddings rotate pairs of dimensions)",
  )
  _check(
    cfg,
    "moe_every",
    _is_int(cfg.moe_every) and cfg.moe_every >= 0,
    "must be an int >= 0 (0 = dense model)",
  )
  _check(
    cfg,
    "first_moe_layer",
    _is_int(cfg.first_moe_layer) and cfg.first_moe_layer >= 0,
    "must be an int >= 0",
  )
  if cfg.moe_every > 0:
    _check(
      cfg,
      "first_moe_layer",
      cfg.first_moe_layer < cfg.num_layers,
      f"must be < {p}.num_layers={cfg.num_layers} when {p}.moe_every > 0",
    )
    _check(
      cfg,
      "moe",
      isinstance(cfg.moe, MoEConfig),
      f"a MoE section is required when {p}.moe_every={cfg.moe_every} > 0",
    )
  else:
    _check(
      cfg, "moe", cfg.moe is None or isinstance(cfg.moe, MoEConfig), "must be a MoE section or None"
    )
  _check(
    cfg,
    "rope_theta",
    _is_number(cfg.rope_theta) and cfg.rope_theta > 0,
    "must be a finite number > 0",
  )
  _check_rope_scaling(cfg)
  _check(
    cfg,
    "rms_norm_eps",
    _is_number(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0,
    "must be a finite number > 0",
  )
  _check(cfg, "remat_policy", cfg.remat_policy in REMAT_POLICIES, f"allowed: {REMAT_POLICIES}")
  _check(
    cfg, "attention_impl", cfg.attention_impl in ATTENTION_IMPLS, f"allowed: {ATTENTION_IMPLS}"
  )
  for name in ("tie_embeddings", "remat", "scan_layers"):
    _check(cfg, name, is_bool(getattr(cfg, name)), "must be a bool")
  _check(cfg, "qk_norm", cfg.qk_norm in QK_NORMS, f"allowed: {QK_NORMS}")
  _check(
    cfg,
    "clip_qkv",
    cfg.clip_qkv is None or (_is_number(cfg.clip_qkv) and cfg.clip_qkv > 0),
    "must be None or a finite number > 0",
  )
  _check(cfg, "attention_bias", is_bool(cfg.attention_bias), "must be a bool")
  for name in ("qk_norm", "clip_qkv", "attention_bias"):
    _check(
      cfg,
      name,
      cfg.attention == "gqa" or getattr(cfg, name) in ("none", None, False),
      f"only attention='gqa' implements it; {p}.attention={cfg.attention!r}",
    )
  for name in ("dtype", "param_dtype"):
    _check(cfg, name, getattr(cfg, name) in DTYPES, f"allowed: {DTYPES}")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline (``moejax.data``).

  Attributes:
    name: a TFDS dataset prepared as array_record (``moejax_tiny_corpus`` is built on use).
    data_dir: TFDS data_dir; None = ``$MOEJAX_DATA_DIR`` or ``~/tensorflow_datasets``.
    train_split, eval_split, text_key: TFDS split names and the text feature.
    seq_len: L, tokens per row (rows are L + 1 packed tokens, shifted by one).
    global_batch_size: rows per step summed over hosts (each host makes // process_count).
    seed: document-order seed; shuffle: train only (eval always reads in document order).
    tokenizer: 'byte', a SentencePiece ``.model`` file, or a HF ``tokenizer.json`` (or its
      directory); see ``moejax.data.tokenizer.load_tokenizer``.
    num_tasks: > 0 adds 'task_id' i32[B, L] to batches, each token's document pseudo-task
      crc32(text) mod num_tasks (``moejax.data.pipeline.document_task``; multi-gate router).
  """

  name: str = "moejax_tiny_corpus"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  text_key: str = "text"
  seq_len: int = 128
  global_batch_size: int = 16
  seed: int = 0
  shuffle: bool = True
  tokenizer: str = "byte"
  num_tasks: int = 0
  config_path: str = dataclasses.field(default="data", compare=False, hash=False, repr=False)

  def __post_init__(self):
    for name in ("name", "train_split", "eval_split", "text_key", "tokenizer"):
      v = getattr(self, name)
      check(self, name, isinstance(v, str) and bool(v), "must be a non-empty string")
    check(
      self,
      "data_dir",
      self.data_dir is None or (isinstance(self.data_dir, str) and bool(self.data_dir)),
      "must be None or a non-empty string",
    )
    for name in ("seq_len", "global_batch_size"):
      check(
        self,
        name,
        is_int(getattr(self, name)) and getattr(self, name) > 0,
        "must be a positive int",
      )
    check(self, "seed", is_int(self.seed) and self.seed >= 0, "must be a non-negative int")
    check(self, "shuffle", is_bool(self.shuffle), "must be a bool")
    check(self, "num_tasks", is_int(self.num_tasks) and self.num_tasks >= 0, "must be an int >= 0")

  @classmethod
  def from_config(cls, cd: Any, path: str = "data") -> DataConfig:
    """Missing fields take their defaults; unknown fields are errors (usually typos)."""
    return section_from_config(cls, cd, path)


# ----------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes of the ('data', 'expert', 'model') mesh (``moejax.parallel.mesh``): each an
  int >= 1, or -1 (at most one axis) for all remaining devices. Every field is required."""

  data: int = -1
  expert: int = 1
  model: int = 1
  config_path: str = dataclasses.field(default="mesh", compare=False, hash=False, repr=False)

  def __post_init__(self):
    fill = None
    for name in field_names(type(self)):
      v = getattr(self, name)
      check(
        self,
        name,
        is_int(v) and (v >= 1 or v == -1),
        "must be an int >= 1, or -1 to use all remaining devices",
      )
      if v == -1:
        check(
          self,
          name,
          fill is None,
          f"only one mesh axis may be -1 and {self.config_path}.{fill} is already -1",
        )
        fill = name

  @classmethod
  def from_config(cls, cd: Any, path: str = "mesh") -> MeshConfig:
    if not isinstance(cd, cls):
      reject_unknown(as_dict(cd), field_names(cls), path)  # names the mesh axes
    return section_from_config(cls, cd, path, required=True)

  def sizes(self) -> dict[str, int]:
    """{axis: size}, -1 still unresolved (``moejax.parallel.mesh.resolve_mesh_shape``)."""
    return {name: int(getattr(self, name)) for name in field_names(type(self))}


# ----------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, logging and checkpointing. Every field is required (configs start
  from ``base_config()``, which has them all).

  Attributes:
    steps: optimizer updates in the whole run.
    learning_rate: peak of linear warmup + cosine decay to learning_rate * end_lr_ratio.
    warmup_steps, end_lr_ratio: the schedule's warmup length and final ratio.
    weight_decay: AdamW's decoupled weight decay; b1, b2: its moment decays.
    grad_clip_norm: global-norm clipping threshold.
    seed: parameter init.
    log_every, eval_every (0 = never), eval_steps, checkpoint_every, keep_checkpoints.
    async_checkpointing: Orbax saves in the background.
    nan_policy: 'stop' the run at a non-finite step, or 'skip' its update.
    fsdp: shard parameters, gradients and optimizer state over the 'data' mesh axis as well
      (ZeRO-3 / FSDP; GSPMD all-gathers each layer's weights where it is used).
    microbatches: gradient accumulation: the global batch is split into this many
      microbatches inside the jitted step (1 = none); same update as one big batch.
    max_consecutive_skips: with nan_policy='skip', this many non-finite steps in a row
      abort the run as diverged (exit 3).
    lock_timeout_s: a workdir lock whose heartbeat is older than this belongs to a dead
      trainer and is taken over (``moejax.training.lock``).
    tensorboard: also write TensorBoard event files into the workdir (tensorboardX).
  """

  steps: int = 1000
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_steps: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  nan_policy: str = "stop"
  fsdp: bool = False
  microbatches: int = 1
  max_consecutive_skips: int = 10
  lock_timeout_s: float = 120.0
  tensorboard: bool = True
  config_path: str = dataclasses.field(default="train", compare=False, hash=False, repr=False)

  def __post_init__(self):
    pos = "must be an int > 0"
    for name in ("steps", "log_every", "eval_steps", "checkpoint_every", "keep_checkpoints"):
      check(self, name, is_int(getattr(self, name)) and getattr(self, name) > 0, pos)
    for name in ("warmup_steps", "seed"):
      check(
        self, name, is_int(getattr(self, name)) and getattr(self, name) >= 0, "must be an int >= 0"
      )
    check(
      self,
      "eval_every",
      is_int(self.eval_every) and self.eval_every >= 0,
      "must be an int >= 0 (0 = never)",
    )
    for name in ("learning_rate", "grad_clip_norm"):
      check(
        self,
        name,
        is_number(getattr(self, name)) and getattr(self, name) > 0,
        "must be a finite number > 0",
      )
    check(
      self,
      "end_lr_ratio",
      is_number(self.end_lr_ratio) and 0 <= self.end_lr_ratio <= 1,
      "must be a number in [0, 1]",
    )
    check(
      self,
      "weight_decay",
      is_number(self.weight_decay) and self.weight_decay >= 0,
      "must be a finite number >= 0",
    )
    for name in ("b1", "b2"):
      check(
        self,
        name,
        is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1,
        "must be a number in [0, 1)",
      )
    check(self, "async_checkpointing", is_bool(self.async_checkpointing), "must be a bool")
    check(self, "nan_policy", self.nan_policy in NAN_POLICIES, f"allowed: {NAN_POLICIES}")
    check(self, "fsdp", is_bool(self.fsdp), "must be a bool")
    check(
      self,
      "microbatches",
      is_int(self.microbatches) and self.microbatches > 0,
      "must be an int > 0 dividing the per-step batch (1 = no gradient accumulation)",
    )
    check(
      self,
      "max_consecutive_skips",
      is_int(self.max_consecutive_skips) and self.max_consecutive_skips > 0,
      "must be an int > 0",
    )
    check(
      self,
      "lock_timeout_s",
      is_number(self.lock_timeout_s) and self.lock_timeout_s > 0,
      "must be a finite number > 0 (seconds)",
    )
    check(self, "tensorboard", is_bool(self.tensorboard), "must be a bool")

  @classmethod
  def from_config(cls, cd: Any, path: str = "train") -> TrainConfig:
    # Fields added later: config.json files written before them still load.
    optional = (
      "fsdp",
      "microbatches",
      "max_consecutive_skips",
      "lock_timeout_s",
      "tensorboard",
    )
    return section_from_config(cls, cd, path, required=True, optional=optional)


# ----------------------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole, validated experiment; built once at the edge (trainer, tools)."""

  model: ModelConfig
  data: DataConfig
  mesh: MeshConfig
  train: TrainConfig

  @classmethod
  def from_config(cls, cd: Any) -> ExperimentConfig:
    """Validates each section (unknown sections and fields are errors) and the cross-section
    constraints:
      data.seq_len <= model.max_len;
      model.vocab_size >= the vocabulary of data.tokenizer (its ids must index the
        embedding; 259 for 'byte');
      data.global_batch_size * data.seq_len % model.moe.group_size == 0 for a MoE model
        with a group size (the MoE layer splits the batch's tokens into whole groups).
    Raises ConfigError naming the field.
    """
    if isinstance(cd, cls):
      return cd
    sections = as_dict(cd)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
      value = sections[unknown[0]]
      value = value.to_dict() if hasattr(value, "to_dict") else value
      raise config_error(
        unknown[0], value, f"unknown config section; allowed sections are {list(SECTIONS)}"
      )
    for name in SECTIONS:
      if name not in sections or sections[name] is None:
        raise ConfigError(
          f"{name} is missing: an experiment config needs the sections "
          f"{list(SECTIONS)} (start from moejax.config.base_config())"
        )
    exp = cls(
      model=ModelConfig.from_config(sections["model"], path="model"),
      data=DataConfig.from_config(sections["data"], path="data"),
      mesh=MeshConfig.from_config(sections["mesh"], path="mesh"),
      train=TrainConfig.from_config(sections["train"], path="train"),
    )
    exp.check_cross_section()
    return exp

  def check_cross_section(self) -> None:
    from moejax.data.tokenizer import load_tokenizer  # local: keeps tfds off the config path

    model, data = self.model, self.data
    if data.seq_len > model.max_len:
      raise config_error("data.seq_len", data.seq_len, f"must be <= model.max_len={model.max_len}")
    vocab = load_tokenizer(data.tokenizer).vocab_size
    if model.vocab_size < vocab:
      raise config_error(
        "model.vocab_size",
        model.vocab_size,
        f"must be >= {vocab}, the vocabulary size of data.tokenizer={data.tokenizer!r}",
      )
    if data.global_batch_size % self.train.microbatches:
      raise config_error(
        "train.microbatches",
        self.train.microbatches,
        f"must divide data.global_batch_size={data.global_batch_size}",
      )
    if model.moe is not None and model.moe.group_size is not None:
      tokens = data.global_batch_size * data.seq_len
      if tokens % model.moe.group_size:
        raise config_error(
          "model.moe.group_size",
          model.moe.group_size,
          f"must divide the tokens of a batch, data.global_batch_size * "
          f"data.seq_len = {data.global_batch_size} * {data.seq_len} = "
          f"{tokens}",
        )

    if model.moe is not None and model.moe.router == "multigate":
      if data.num_tasks != model.moe.num_tasks:
        raise config_error(
          "data.num_tasks",
          data.num_tasks,
          f"must equal model.moe.num_tasks={model.moe.num_tasks} (router='multigate' "
          "selects each token's gate by the batch's task_id)",
        )

  def replace_fields(self, fields: dict[str, Any]) -> ExperimentConfig:
    """A new validated config with dotted fields set, e.g. ``{"model.moe.num_experts": 4,
    "mesh.expert": 2}``; a section that is None (a dense model's ``model.moe``) starts
    from its defaults. An unknown or invalid field is a ConfigError naming it."""
    return ExperimentConfig.from_config(with_overrides(self.to_config_dict(), fields))

  def to_config_dict(self) -> ml_collections.ConfigDict:
    """The ConfigDict form (what ``config.json`` of a run holds)."""
    cd = ml_collections.ConfigDict()
    for name in SECTIONS:
      cd[name] = to_config_dict(getattr(self, name))
    return cd


# ----------------------------------------------------------------------------- defaults


def default_moe_config() -> ml_collections.ConfigDict:
  """The ``model.moe`` section with ``MoEConfig``'s defaults."""
  return to_config_dict(MoEConfig())


def default_model_config() -> ml_collections.ConfigDict:
  """The ``model`` section with ``ModelConfig``'s defaults (dense: moe_every=0) and a ``moe``
  sub-section with ``MoEConfig``'s, so that setting ``model.moe_every`` makes it MoE."""
  cd = to_config_dict(ModelConfig())
  cd.moe = default_moe_config()
  return cd


def default_data_config() -> ml_collections.ConfigDict:
  return to_config_dict(DataConfig())


def default_mesh_config() -> ml_collections.ConfigDict:
  """All devices on the data axis."""
  return to_config_dict(MeshConfig())


def default_train_config() -> ml_collections.ConfigDict:
  return to_config_dict(TrainConfig())


def base_config() -> ml_collections.ConfigDict:
  """A complete, valid experiment config (the dataclass defaults) that ``configs/*.py``
  start from."""
  cfg = ml_collections.ConfigDict()
  cfg.model = default_model_config()
  cfg.data = default_data_config()
  cfg.mesh = default_mesh_config()
  cfg.train = default_train_config()
  return cfg


def with_overrides(
  cd: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of the ConfigDict `cd` with dotted fields set, e.g. {'mesh.expert': 2,
  'model.moe.top_k': 1}; missing sub-sections are created. For ConfigDicts before they are
  parsed (``configs/*.py``, command-line style overrides); a parsed config uses
  ``ExperimentConfig.replace_fields``."""
  new = copy.deepcopy(cd)
  with new.unlocked():
    for dotted, value in overrides.items():
      *parents, leaf = dotted.split(".")
      node = new
      for i, p in enumerate(parents):
        if node.get(p) is None:
          node[p] = ml_collections.ConfigDict()
        elif not isinstance(node[p], ml_collections.ConfigDict):
          path = ".".join(parents[: i + 1])
          raise config_error(dotted, value, f"{path}={node[p]!r} is not a config section")
        node = node[p]
      with node.ignore_type():
        node[leaf] = value
  return new
