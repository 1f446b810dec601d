"""Switch-Base-like (Fedus et al., 2021): T5-Base width, every other FFN a top-1 MoE.

12 decoder layers of d_model 768, 12 heads of 64; layers 1, 3, ..., 11 are MoE
(HF Switch ``sparse_step=2``) with 128 experts of width 3072 (Switch-Base-128; set
``--config.model.moe.num_experts=8`` .. 256 for the paper's other sizes), top-1 routing
with capacity factor 1.25, GeGLU experts, load-balance weight 0.01 and no z-loss. This is
a decoder-only LM, not the paper's encoder-decoder; the dense layers use SwiGLU.
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.vocab_size = 32128
  m.d_model = 768
  m.num_layers = 12
  m.num_heads = 12
  m.num_kv_heads = 12
  m.head_dim = 64
  m.d_ff = 3072
  m.moe_every = 2
  m.first_moe_layer = 1
  m.max_len = 2048
  m.dtype = "bfloat16"
  m.moe.router = "topk"
  m.moe.num_experts = 128
  m.moe.expert_d_ff = 3072
  m.moe.top_k = 1
  m.moe.capacity_factor = 1.25
  m.moe.router_order = "softmax_topk"
  m.moe.activation = "gelu"
  m.moe.load_balance_weight = 0.01
  m.moe.z_loss_weight = 0.0

  cfg.data.seq_len = 512
  cfg.data.global_batch_size = 256

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 1, 1

  t = cfg.train
  t.steps = 100_000
  t.learning_rate = 1e-3
  t.warmup_steps = 1000
  t.log_every = 50
  t.eval_every = 1000
  t.eval_steps = 20
  t.checkpoint_every = 1000
  return cfg
