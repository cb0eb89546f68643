"""Evaluation (SPEC section 7): tokenizer reconstructions and generated samples.

Tokenizer: PSNR, SSIM, LPIPS averaged over images; codebook usage (fraction
of codes hit over the whole pass) and perplexity of the pass's code
histogram; with `config.eval.fid`, rFID and KID of the reconstructions
against the validation images' Inception statistics (cached per data set,
split and resolution), and optionally precision/recall.

Samples (generators): FID/KID (and precision/recall) of image batches
against reference statistics (`sample_metrics`).

Inception Score (Salimans et al. 2016) of the reconstructions or samples,
with `config.eval.inception_logits_path`: the shipped FID weights
(`default_1.pt`) stop at pool3, so the 1008-way logits head comes from
pytorch-fid's Inception file, which the user downloads
(`vqjax.weights.inception_logits`); the pool3 features stay the FID ones.
Without that file the eval JSON carries the note `IS_UNAVAILABLE`, which
says how to enable IS, instead of a score from a head that is not there.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from vqjax.console import console, warn
from vqjax.core import partitioning
from vqjax.core.writers import image_grid, write_images, write_json
from vqjax.data.pipeline import eval_batches
from vqjax.eval import feature_stats as fs
from vqjax.eval import inception_features as incf
from vqjax.eval.settings import INCEPTION_LOGITS_ENV, inception_logits_file
from vqjax.ops import quantize as vq
from vqjax.weights import inception_logits


def summarize_eval(sums: dict) -> dict[str, float]:
  """Per-batch sums -> means, codebook usage and perplexity over the pass."""
  n = max(float(sums["count"]), 1.0)
  counts = sums["code_counts"]
  return {
      "psnr": float(sums["psnr"]) / n,
      "ssim": float(sums["ssim"]) / n,
      "lpips": float(sums["lpips"]) / n,
      "codebook_usage": float(vq.usage_fraction(counts)),
      "perplexity": float(vq.perplexity(counts)),
      "num_examples": int(n),
  }


IS_FIELD = "eval.inception_logits_path"
IS_UNAVAILABLE = (f"inception_score: not computed; the shipped FID Inception (default_1.pt) has "
                  f"no logits head, only pool3 features. To compute it, download pytorch-fid's "
                  f"{inception_logits.FILE_NAME} from {inception_logits.URL} and set "
                  f"{INCEPTION_LOGITS_ENV}=<its path> or --config.{IS_FIELD}")


def is_notes(config) -> list[str]:
  """The eval JSON's notes about the Inception Score: `IS_UNAVAILABLE` when it is off."""
  return [] if inception_logits_file(config.eval) else [IS_UNAVAILABLE]


def class_probabilities(config, inception: incf.InceptionExtractor
                        ) -> incf.ClassProbabilities | None:
  """An empty IS accumulator with the head of `config.eval.inception_logits_path` (loaded
  once per process); None when the field is not set."""
  path = inception_logits_file(config.eval)
  if not path:
    return None
  kernel, _ = inception_logits.load_inception_logits_head(path, IS_FIELD,
                                                          inception.weights_path)
  return incf.ClassProbabilities(kernel)


def distribution_metrics(fake: dict, ref: dict, config, prefix: str = "") -> dict[str, float]:
  """FID (+ KID, precision/recall when raw features are at hand) of `fake` against `ref`.

  Both are dicts from `inception_features.stats_dict` / `load_stats`.
  """
  e = config.eval
  out = {f"{prefix}fid": fs.frechet_distance(fake["mu"], fake["sigma"], ref["mu"], ref["sigma"],
                                             method=e.fid_method)}
  fa, fb = fake["features"], ref["features"]
  if len(fa) >= 2 and len(fb) >= 2:
    kid, kid_std = fs.kernel_inception_distance(fa, fb, e.kid_subsets, e.kid_subset_size,
                                                seed=config.seed)
    out[f"{prefix}kid"], out[f"{prefix}kid_std"] = kid, kid_std
  if e.precision_recall and min(len(fa), len(fb)) > 3:
    out["precision"], out["recall"] = fs.precision_recall(fb, fa, k=3)
  return out


class ReferenceStats:
  """The val split's Inception statistics: loaded from the cache, or built during a pass."""

  def __init__(self, config, extractor: incf.InceptionExtractor, split: str):
    self.description = incf.data_description(config, split)
    self.path = incf.reference_path(config.eval.stats_cache_dir, self.description,
                                    extractor.weights_path)
    self.cached = None
    if os.path.exists(self.path):
      try:
        self.cached = incf.load_stats(self.path)
      except fs.FIDError as e:  # a half-written or damaged file: rebuild it in this pass
        warn(f"{e}; recomputing it")
    self.building = None if self.cached else fs.RunningStats(incf.FEATURE_DIM,
                                                             config.eval.max_features)

  def finish(self) -> dict:
    if self.cached is not None:
      return self.cached
    if jax.process_index() == 0:
      incf.save_stats(self.path, self.building, self.description)
    return incf.stats_dict(self.building)


def reference_stats(config, extractor: incf.InceptionExtractor, split: str) -> dict:
  """A split's reference statistics under `config`: from the cache, or one pass (then cached)."""
  ref = ReferenceStats(config, extractor, split)
  if ref.building is not None:
    total = config.eval.max_examples or None
    with incf.progress_bar(total, f"reference {split}") as bar:
      for batch in eval_batches(config, jax.process_index(), jax.process_count(), split=split):
        images = partitioning.shard_batch({"x": batch["image"]}, extractor.mesh)["x"]
        extractor.accumulate(ref.building, images, batch["mask"])
        bar.update(int(batch["mask"].sum()))
  return ref.finish()


def real_rows_grid(batch: dict, x_hat: np.ndarray) -> np.ndarray | None:
  """[input | reconstruction] rows of a padded eval batch's real images only (mask > 0),
  never the padding's repeats of its last image; None when the batch has no real image."""
  real = np.asarray(batch["mask"]) > 0
  if not real.any():
    return None
  return image_grid([np.asarray(batch["image"])[real], x_hat[real]])


def evaluate_tokenizer(eval_step, params, vq_stats, lpips_params, config, mesh,
                       inception: incf.InceptionExtractor | None = None,
                       return_counts: bool = False) -> tuple:
  """One pass over the val split; returns (metrics, grid of the first batch), and with
  `return_counts` also the pass's code counts [K] (float, summed over every token)."""
  totals = None
  grid = None
  use_fid = bool(config.eval.fid) and inception is not None
  if use_fid:
    ref = ReferenceStats(config, inception, config.data.val_split)
    fake = fs.RunningStats(incf.FEATURE_DIM, config.eval.max_features)
    probs = class_probabilities(config, inception)
  total = config.eval.max_examples or None
  with incf.progress_bar(total, "eval") as bar:
    for i, batch in enumerate(eval_batches(config, jax.process_index(), jax.process_count())):
      device_batch = partitioning.shard_batch(batch, mesh)
      sums, x_hat = eval_step(params, vq_stats, device_batch, lpips_params)
      if use_fid:
        inception.accumulate(fake, x_hat, batch["mask"], probs)
        if ref.building is not None:
          inception.accumulate(ref.building, device_batch["image"], batch["mask"])
      sums = jax.device_get(sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      bar.update(int(sums["count"]))
      if i == 0:  # this process's rows (process 0's are the ones written)
        grid = real_rows_grid(batch, partitioning.local_rows(x_hat))
  if totals is None:
    raise ValueError("the validation split yielded no images: check config.data and "
                     "config.eval.max_examples")
  metrics = summarize_eval(totals)
  if use_fid:
    metrics.update(distribution_metrics(incf.stats_dict(fake), ref.finish(), config, prefix="r"))
    if probs is not None:
      metrics.update(probs.score())
  if return_counts:
    return metrics, grid, np.asarray(totals["code_counts"])
  return metrics, grid


def sample_metrics(batches, reference: dict, config, inception: incf.InceptionExtractor,
                   total: int | None = None) -> dict[str, float]:
  """FID/KID of generated images ({'image', 'mask'} batches in [-1, 1]) against `reference`,
  and their Inception Score with `config.eval.inception_logits_path`."""
  probs = class_probabilities(config, inception)
  stats = inception.stats_of_batches(batches, total, "sample features", config.eval.max_features,
                                     probs)
  return {**distribution_metrics(incf.stats_dict(stats), reference, config),
          **(probs.score() if probs is not None else {}), "num_samples": stats.n}


def write_eval(writer, workdir: str, step: int, metrics: dict, grid: np.ndarray | None,
               notes: list[str] | None = None, extra: dict | None = None) -> str:
  """Scalars to TensorBoard (prefix eval/), `workdir/eval_<step>.json`, and the grid.

  `extra`: entries for the JSON only (not scalars), e.g. the paths of the codebook plots.
  """
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  if grid is not None:
    write_images(writer, workdir, step, "eval_reconstructions", grid)
  path = os.path.join(workdir, f"eval_{step}.json")
  if jax.process_index() == 0:
    write_json(path, {"step": step, **metrics, **(extra or {}),
                      **({"notes": notes} if notes else {})})
  console(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
  return path
