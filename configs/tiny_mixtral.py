"""A tiny Mixtral (every layer MoE, top-2 of 4 experts, dropless, renormalised top-k) that
trains on 2 CPU cores and exports to a transformers ``MixtralForCausalLM`` in a minute.

python -m moejax.train --config configs/tiny_mixtral.py --workdir runs/tiny_mixtral
moejax-convert export-hf --workdir runs/tiny_mixtral --out runs/tiny_mixtral_hf
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.vocab_size = 259  # byte tokenizer
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.d_ff = 128
  m.moe_every = 1  # Mixtral: every layer is MoE
  m.first_moe_layer = 0
  m.max_len = 256
  m.moe.num_experts = 4
  m.moe.expert_d_ff = 128
  m.moe.top_k = 2
  m.moe.router = "topk"
  m.moe.router_order = "topk_softmax"  # Mixtral renormalises the top-k weights
  m.moe.dropless = True  # transformers never drops tokens
  m.moe.activation = "silu"
  m.moe.load_balance_weight = 0.01
  m.moe.z_loss_weight = 1e-3

  cfg.data.name = "moejax_tiny_corpus"
  cfg.data.seq_len = 128
  cfg.data.global_batch_size = 16

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 1, 1

  t = cfg.train
  t.steps = 100
  t.learning_rate = 3e-3
  t.warmup_steps = 10
  t.checkpoint_every = 100
  t.eval_every = 100
  t.eval_steps = 2
  t.log_every = 10
  t.keep_checkpoints = 1
  t.async_checkpointing = True
  t.nan_policy = "stop"
  return cfg
