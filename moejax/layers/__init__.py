"""Flax layers: the MoE FFN and the dense FFN it is compared against.

ffn.py              gated FFNs (dense, and stacked experts on slot buffers)
dispatch.py         slot buffers: gather tokens in, scatter-add outputs back
grouped.py          grouped expert matmuls on expert-sorted rows (dropless)
routed.py           the single-device routed forward (route, experts, combine)
expert_parallel.py  the same under ``jax.shard_map`` with all_to_all exchanges
moe.py              the Flax MoELayer
"""

from moejax.layers.dispatch import combine, dispatch
from moejax.layers.ffn import DenseFFN, expert_ffn, gated_ffn
from moejax.layers.moe import MoELayer, to_groups
from moejax.layers.routed import moe_forward
