"""Evaluation: reconstruction metrics and codebook usage for tokenizers."""
