"""Flax Linen modules: thin wrappers around vqjax.ops."""
