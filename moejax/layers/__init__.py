"""Flax layers: the MoE FFN and the dense FFN it is compared against."""

from moejax.layers.dispatch import combine, dispatch
from moejax.layers.ffn import DenseFFN, expert_ffn, gated_ffn
from moejax.layers.moe import MoELayer, moe_forward, to_groups
