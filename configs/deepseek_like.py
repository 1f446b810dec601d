"""DeepSeek-V2-Lite's shape (DeepSeek-AI, 2024): MLA attention + DeepSeekMoE experts.

27 layers of width 2048; Multi-head Latent Attention with 16 heads, a 512-wide compressed
KV latent, per-head 128 "nope" + 64 RoPE query/key dims and 128 value dims, queries
projected directly (no q LoRA). Layer 0 keeps a dense FFN (d_ff 10944); layers 1..26 are
DeepSeekMoE with 64 routed experts of width 1408, top-6, plus 2 always-on shared experts;
softmax -> top-k gates, unnormalised (router_order='softmax_topk'), routed scaling 1.0.
15.7B parameters (tests/test_config.py checks the count). Differences from the released
model: default RoPE instead of YaRN (its 32k context extension), and capacity-limited
routing for training (set model.moe.dropless=True to match HF DeepseekV2 exactly; see
moejax.convert.hf_deepseek for export to transformers).
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.vocab_size = 102400
  m.d_model = 2048
  m.num_layers = 27
  m.num_heads = 16
  m.num_kv_heads = 16  # unused by MLA
  m.head_dim = 128  # unused by MLA
  m.attention = "mla"
  m.q_lora_rank = 0
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.d_ff = 10944
  m.moe_every = 1
  m.first_moe_layer = 1
  m.rope_theta = 1e4
  m.rms_norm_eps = 1e-6
  m.max_len = 4096
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = True
  m.remat_policy = "full"  # or "save_a2a": no replayed all_to_alls, more saved activations
  m.scan_layers = True  # nn.scan over the blocks: compile time independent of depth
  m.attention_impl = "auto"  # cuDNN flash on GPU, blockwise online softmax elsewhere
  m.moe.router = "shared_experts"
  m.moe.num_experts = 64
  m.moe.num_shared_experts = 2
  m.moe.expert_d_ff = 1408
  m.moe.top_k = 6
  m.moe.router_order = "softmax_topk"
  m.moe.routed_scaling_factor = 1.0
  m.moe.capacity_factor = 1.25
  m.moe.load_balance_weight = 0.001  # expert-level balance factor (V2-Lite aux_loss_alpha)
  m.moe.z_loss_weight = 0.0

  cfg.data.seq_len = 4096
  cfg.data.global_batch_size = 512

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 8, 1

  t = cfg.train
  t.fsdp = True  # params, gradients and AdamW moments split over every device (ZeRO-3)
  t.microbatches = 1  # gradient accumulation, e.g. 4 for 4 sequences per chip
  t.steps = 100_000
  t.learning_rate = 4.2e-4
  t.warmup_steps = 2000
  t.log_every = 50
  t.eval_every = 1000
  t.eval_steps = 50
  t.checkpoint_every = 1000
  return cfg
