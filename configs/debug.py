"""The smallest useful MoE model, for stepping through code on one GPU or a laptop CPU.

Compiles in seconds; every layer is MoE (4 experts, top-2) so routing code always runs.
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.d_ff = 128
  m.moe_every = 1
  m.first_moe_layer = 0
  m.max_len = 256
  m.moe.num_experts = 4
  m.moe.expert_d_ff = 64
  m.moe.top_k = 2
  m.moe.router = "topk"

  cfg.data.seq_len = 64
  cfg.data.global_batch_size = 8

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 1, 1

  t = cfg.train
  t.steps = 20
  t.learning_rate = 1e-3
  t.warmup_steps = 2
  t.log_every = 1
  t.eval_every = 10
  t.eval_steps = 2
  t.checkpoint_every = 10
  t.keep_checkpoints = 2
  t.async_checkpointing = False
  return cfg
