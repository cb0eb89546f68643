"""The FID/KID config fields that tokenizer and transformer recipes share, and their check.

Light on purpose (no JAX or TensorFlow import): recipe files build on it.
"""

from __future__ import annotations

import ml_collections

from vqjax.errors import ConfigError


def add_fid_settings(e: ml_collections.ConfigDict) -> None:
  """Add the distribution-metric fields to an `eval` config slice (see evaluator.py)."""
  e.fid_method = "sqrtm"  # 'sqrtm' (SciPy, float64) | 'eigh' (same value, ~6x faster)
  e.kid_subsets = 100
  e.kid_subset_size = 1000
  e.precision_recall = False  # k-NN (k=3) manifold precision/recall
  e.max_features = 50_000  # raw features kept per set for KID and precision/recall
  e.stats_cache_dir = ""  # '' = $VQJAX_CACHE_DIR or ~/.cache/vqjax/fid_stats


def validate_fid_settings(e: ml_collections.ConfigDict) -> None:
  """Enumerated values and ranges of the fields `add_fid_settings` adds."""
  if e.fid_method not in ("sqrtm", "eigh"):
    raise ConfigError(f"eval.fid_method must be 'sqrtm' or 'eigh', not {e.fid_method!r}.")
  for name in ("kid_subsets", "kid_subset_size", "max_features"):
    if e[name] < 1:
      raise ConfigError(f"eval.{name}={e[name]} must be >= 1.")
