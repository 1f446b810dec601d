"""moejax: sharded Mixture-of-Experts transformers in JAX/Flax."""

__version__ = "0.1.0"
