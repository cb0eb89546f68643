"""vqjax: vector-quantised image tokenizers and token transformers in JAX/Flax."""

__version__ = "0.1.0"
