"""A small MoE LM (8 experts, top-2, every other layer) that trains in minutes on 2 CPU cores.

python -m moejax.train --config configs/tiny_cpu.py --workdir runs/tiny
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.vocab_size = 259  # byte tokenizer
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.d_ff = 256
  m.moe_every = 2
  m.first_moe_layer = 1  # layers 1 and 3 are MoE
  m.max_len = 512
  m.moe.num_experts = 8
  m.moe.expert_d_ff = 128
  m.moe.top_k = 2
  m.moe.router = "topk"
  m.moe.capacity_factor = 1.25
  m.moe.load_balance_weight = 0.01
  m.moe.z_loss_weight = 1e-3

  cfg.data.name = "moejax_tiny_corpus"
  cfg.data.seq_len = 128
  cfg.data.global_batch_size = 16

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 1, 1

  t = cfg.train
  t.steps = 300
  t.learning_rate = 3e-3
  t.warmup_steps = 30
  t.checkpoint_every = 100
  t.eval_every = 100
  t.eval_steps = 4
  t.log_every = 10
  t.keep_checkpoints = 3
  t.async_checkpointing = True
  t.nan_policy = "stop"
  return cfg
