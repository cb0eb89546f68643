"""The FID/KID config fields that tokenizer and transformer recipes share, and their check.

Light on purpose (no JAX or TensorFlow import): recipe files build on it.
"""

from __future__ import annotations

import ml_collections

from vqjax.checks import check_fields


def add_fid_settings(e: ml_collections.ConfigDict) -> None:
  """Add the distribution-metric fields to an `eval` config slice (see evaluator.py)."""
  e.fid_method = "sqrtm"  # 'sqrtm' (SciPy, float64) | 'eigh' (same value, ~6x faster)
  e.kid_subsets = 100
  e.kid_subset_size = 1000
  e.precision_recall = False  # k-NN (k=3) manifold precision/recall
  e.max_features = 50_000  # raw features kept per set for KID and precision/recall
  e.stats_cache_dir = ""  # '' = $VQJAX_CACHE_DIR or ~/.cache/vqjax/fid_stats


# Ranges and choices of the fields `add_fid_settings` adds (vqjax.checks).
FID_RULES = {"fid_method": ("sqrtm", "eigh"), "kid_subsets": ">=1", "kid_subset_size": ">=1",
             "max_features": ">=1"}


def validate_fid_settings(e: ml_collections.ConfigDict) -> None:
  """ConfigError for a field `add_fid_settings` adds outside `FID_RULES`."""
  check_fields(e, "eval", FID_RULES)
