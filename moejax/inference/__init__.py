"""Text generation: sampling, routers in inference mode, a jitted prefill + KV-cached decode,
SCMoE self-contrast decoding."""

from moejax.inference.contrast import ContrastConfig
from moejax.inference.decode import (
  generate_tokens,
  inference_model_config,
  left_pad,
)
from moejax.inference.sampling import SamplingConfig, sample

__all__ = [
  "ContrastConfig",
  "SamplingConfig",
  "generate_tokens",
  "inference_model_config",
  "left_pad",
  "sample",
]
