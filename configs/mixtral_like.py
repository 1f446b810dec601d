"""Mixtral-8x7B's shape (Jiang et al., 2024): 32 layers, all MoE, 8 experts, top-2.

~46.7B parameters (12.9B active per token). Router: softmax over the top-2 logits
(router_order='topk_softmax') and no token dropping, as in HF ``MixtralForCausalLM``;
aux loss coefficient 0.02 (HF ``router_aux_loss_coef``), no z-loss. Needs a pod: e.g.
``--config.mesh.expert=8 --config.mesh.model=4``. The data section still points at the
tiny byte corpus (ids < 259 index this 32000-row vocabulary).
"""

from moejax.config import base_config


def get_config():
  cfg = base_config()
  m = cfg.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 14336  # unused: every layer is MoE
  m.moe_every = 1
  m.first_moe_layer = 0
  m.rope_theta = 1e6
  m.rms_norm_eps = 1e-5
  m.max_len = 32768
  m.tie_embeddings = False
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = True
  m.remat_policy = "full"  # or "save_a2a": no replayed all_to_alls, more saved activations
  m.scan_layers = True  # nn.scan over the blocks: compile time independent of depth
  m.attention_impl = "auto"  # cuDNN flash on GPU, blockwise online softmax elsewhere
  m.moe.num_experts = 8
  m.moe.expert_d_ff = 14336
  m.moe.top_k = 2
  m.moe.router = "topk"
  m.moe.router_order = "topk_softmax"
  m.moe.dropless = True
  m.moe.activation = "silu"
  m.moe.load_balance_weight = 0.02
  m.moe.z_loss_weight = 0.0

  cfg.data.seq_len = 4096
  cfg.data.global_batch_size = 256

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = -1, 8, 1

  t = cfg.train
  t.fsdp = True  # params, gradients and AdamW moments split over every device (ZeRO-3)
  t.microbatches = 1  # gradient accumulation, e.g. 4 for 4 sequences per chip
  t.steps = 100_000
  t.learning_rate = 3e-4
  t.warmup_steps = 2000
  t.weight_decay = 0.1
  t.log_every = 50
  t.eval_every = 1000
  t.eval_steps = 50
  t.checkpoint_every = 1000
  return cfg
