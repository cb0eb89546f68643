"""The FID/KID config fields that tokenizer and transformer recipes share, and their check.

Light on purpose (no JAX or TensorFlow import): recipe files build on it.
"""

from __future__ import annotations

import os

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
  # Inception Score (Salimans et al. 2016) of the images FID is computed on, with the 1008-way
  # head of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (downloaded by the user from
  # github.com/mseitzer/pytorch-fid/releases/download/fid_weights/); '' = no IS. It scores
  # every image (not capped by max_features), in 10 splits (fewer below 20 images).
  # '' also reads $VQJAX_INCEPTION_LOGITS, which reaches every stage of a pipeline.
  e.inception_logits_path = ""


# Ranges and choices of the fields `add_fid_settings` adds (vqjax.checks).
FID_RULES = {"fid_method": ("sqrtm", "eigh"), "kid_subsets": ">=1", "kid_subset_size": ">=1",
             "max_features": ">=1"}


INCEPTION_LOGITS_ENV = "VQJAX_INCEPTION_LOGITS"


def inception_logits_file(e: ml_collections.ConfigDict) -> str:
  """The Inception logits file: `e.inception_logits_path`, or when it is ''
  $VQJAX_INCEPTION_LOGITS; '' when neither is set (no Inception Score)."""
  return e.get("inception_logits_path") or os.environ.get(INCEPTION_LOGITS_ENV, "")


def validate_fid_settings(e: ml_collections.ConfigDict) -> None:
  """ConfigError for a field `add_fid_settings` adds outside `FID_RULES`; when
  `inception_logits_path` is set, the file's layout is checked (an error names the file)."""
  check_fields(e, "eval", FID_RULES)
  if inception_logits_file(e):
    # Imported here: the check needs JAX (the Inception's parameter tree), this module not.
    from vqjax.weights.inception_logits import check_inception_logits_file

    check_inception_logits_file(inception_logits_file(e), "eval.inception_logits_path")
