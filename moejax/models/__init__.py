"""Decoder-only transformer (RMSNorm, RoPE, GQA) with dense or MoE FFN layers."""

from moejax.models.transformer import Block, Transformer

__all__ = ["Block", "Transformer"]
