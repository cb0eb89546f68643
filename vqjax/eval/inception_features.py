"""Inception pool3 features for FID/KID, sharded over the mesh's data axis, and their cache.

`InceptionExtractor` jits `FIDInceptionV3` with the weights from
`default_1.pt` replicated and the batch split over `data`; it takes images in
[-1, 1] at any size (resized inside the jitted function). Reference
statistics of a data split (mean, covariance and up to N raw features for
KID) are computed once and cached as `.npz` under a cache directory, named
by a hash of everything that changes them (`reference_key`). `ClassProbabilities`
turns the same features into the class probabilities of the Inception Score.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from typing import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from vqjax.core import partitioning
from vqjax.eval.feature_stats import FIDError, RunningStats, inception_score, inception_score_splits
from vqjax.nn.inception import FEATURE_DIM, FIDInceptionV3, inception_input
from vqjax.weights.fid_inception import fid_inception_path, file_digest, load_fid_inception_params

# Bump when the preprocessing in front of the network changes (invalidates caches).
PREPROCESS_VERSION = "tf1-bilinear-299/range[-1,0.9921875]/v1"
STATS_FORMAT = 1


def default_cache_dir() -> str:
  return os.environ.get("VQJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "vqjax", "fid_stats")


@functools.partial(jax.jit, static_argnames="precision")
def _features(params, images, precision: str):
  # One module-level jit: extractors built for the same mesh share compilations. The batch
  # arrives split over `data` and the params replicated; the output keeps the batch split.
  return FIDInceptionV3(precision=precision).apply({"params": params}, inception_input(images))


class InceptionExtractor:
  """Jitted, data-parallel FID Inception: [B, H, W, 3] in [-1, 1] -> [B, 2048] float32."""

  def __init__(self, mesh: Mesh, weights_path: str | None = None, precision: str = "highest",
               params=None):
    """`params`: parameters to use instead of the weight file's (a speed benchmark passes
    random ones where the file is not installed); `weights_path` is then None."""
    self.mesh = mesh
    self.precision = precision
    if params is None:
      self.weights_path = os.path.abspath(weights_path or fid_inception_path())
      params = load_fid_inception_params(self.weights_path)
    else:
      self.weights_path = None
    self.params = jax.device_put(params, partitioning.replicated(mesh))

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"] * jax.process_count()

  def __call__(self, images) -> jax.Array:
    """Features of a batch already laid out over the mesh (or a host array to shard)."""
    if not isinstance(images, jax.Array):
      images = partitioning.shard_batch({"x": np.asarray(images, np.float32)}, self.mesh)["x"]
    return _features(self.params, images, self.precision)

  def gather(self, features: jax.Array, mask) -> np.ndarray:
    """Global features of the real (mask > 0) rows, on every host."""
    feats = np.asarray(multihost_utils.process_allgather(features, tiled=True))
    if isinstance(mask, jax.Array) or jax.process_count() > 1:
      # A host mask is this process's rows; the gathered features are all processes' rows.
      mask = multihost_utils.process_allgather(mask, tiled=True)
    return feats[np.asarray(mask) > 0]

  def accumulate(self, stats: RunningStats, images, mask,
                 probs: ClassProbabilities | None = None) -> None:
    """Add the real rows' features to `stats` (and their class probabilities to `probs`)."""
    features = self.gather(self(images), mask)
    stats.update(features)
    if probs is not None:
      probs.update(features)

  def stats_of_batches(self, batches: Iterable[dict], total: int | None = None,
                       desc: str = "Inception features", max_features: int = 50_000,
                       probs: ClassProbabilities | None = None) -> RunningStats:
    """RunningStats over batches {'image': [B,H,W,3] in [-1,1], 'mask': [B]} with a progress
    bar; `probs`, when given, collects the same images' class probabilities."""
    stats = RunningStats(FEATURE_DIM, max_features)
    with progress_bar(total, desc) as bar:
      for batch in batches:
        images = partitioning.shard_batch({"x": batch["image"]}, self.mesh)["x"]
        before = stats.n
        self.accumulate(stats, images, batch["mask"], probs)
        bar.update(stats.n - before)
    return stats


class ClassProbabilities:
  """The 1008 class probabilities of every image, for the Inception Score (Salimans et al.
  2016, section 4), from pool3 features and the logits head's kernel [2048, 1008].

  logits = features @ kernel, without the head's bias: the authors' TF code multiplies pool3
  by the weights of the graph's `softmax/logits/MatMul` and never adds the bias, and
  torch-fidelity's `logits_unbiased` does the same, so the scores are comparable with theirs.
  The softmax runs over all 1008 outputs (the graph's 1000 ImageNet classes and 8 unused
  ones) in float64, after a float32 matrix product. Every image is kept, whatever
  `eval.max_features` (which caps only the raw features for KID): 1008 float32 per image,
  about 200 MB at 50k images.
  """

  def __init__(self, kernel: np.ndarray):
    self.kernel = np.asarray(kernel, np.float32)
    if self.kernel.shape[0] != FEATURE_DIM or self.kernel.ndim != 2:
      raise ValueError(f"the logits kernel must be [{FEATURE_DIM}, classes], got "
                       f"{self.kernel.shape}")
    self._probs: list[np.ndarray] = []

  def update(self, features) -> None:
    logits = (np.asarray(features, np.float32) @ self.kernel).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    self._probs.append((p / p.sum(axis=1, keepdims=True)).astype(np.float32))

  @property
  def n(self) -> int:
    return sum(len(p) for p in self._probs)

  @property
  def probs(self) -> np.ndarray:
    if not self._probs:
      return np.zeros((0, self.kernel.shape[1]), np.float32)
    return np.concatenate(self._probs)

  def score(self, num_splits: int = 10) -> dict[str, float]:
    """{'inception_score', 'inception_score_std'}: mean and std over
    `inception_score_splits(n, num_splits)` splits; {} before any image."""
    if not self.n:
      return {}
    probs = self.probs
    mean, std = inception_score(probs, inception_score_splits(len(probs), num_splits))
    return {"inception_score": mean, "inception_score_std": std}


def progress_bar(total: int | None, desc: str):
  return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
              disable=jax.process_index() != 0, mininterval=2.0)


def reference_key(description: dict, weights_path: str) -> str:
  """Content key of reference statistics: the data description + extractor identity."""
  payload = {"data": description, "inception_sha1": file_digest(weights_path),
             "preprocess": PREPROCESS_VERSION, "format": STATS_FORMAT}
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def data_description(config, split: str) -> dict:
  """What determines a split's reference images under `config` (the cache key's data part)."""
  d = config.data
  desc = {"source": d.source, "split": split, "image_size": d.image_size,
          "resize_shorter": d.resize_shorter, "eval_random_crop": d.eval_random_crop,
          "max_examples": config.eval.max_examples, "seed": config.seed}
  if d.source == "tfds":
    desc.update(name=d.name, data_dir=d.data_dir)
  elif d.source == "folder":
    desc.update(folder=os.path.abspath(d.folder), val_folder=d.val_folder,
                val_fraction=d.val_fraction)
  elif d.source == "embedded":
    desc.update(eval_crops_per_image=d.eval_crops_per_image)
  if d.get("label_maps", ""):  # 'paired' skips images without a map; none: the key as before
    desc.update(label_maps=d.label_maps, semantic_classes=d.semantic_classes,
                label_folder=d.label_folder, val_label_folder=d.val_label_folder,
                label_map_key=d.label_map_key, label_map_channel=d.label_map_channel)
  return desc


def reference_path(cache_dir: str, description: dict, weights_path: str) -> str:
  name = description.get("name") or description["source"]
  stem = f"{name}_{description['split']}_{description['image_size']}px"
  return os.path.join(cache_dir or default_cache_dir(),
                      f"{stem}_{reference_key(description, weights_path)}.npz")


def save_stats(path: str, stats: RunningStats, description: dict | None = None) -> str:
  """mu, sigma, features (float32) and the description, written atomically."""
  mu, sigma = stats.mean_cov()
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  np.savez(tmp, mu=mu, sigma=sigma, features=stats.features, num_images=np.int64(stats.n),
           description=json.dumps(description or {}, sort_keys=True, default=str))
  os.replace(tmp, path)
  return path


def load_stats(path: str) -> dict:
  """{'mu', 'sigma', 'features' (may be empty), 'num_images'} from a stats `.npz`."""
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {"mu": z["mu"], "sigma": z["sigma"],
             "features": z["features"] if "features" in z else np.zeros((0, FEATURE_DIM)),
             "num_images": int(z["num_images"]) if "num_images" in z else -1}
  except (OSError, ValueError, KeyError) as e:
    raise FIDError(f"cannot read FID statistics from {path} ({e}): it must be an .npz with "
                   "'mu' and 'sigma' (as written by vqjax); delete it to recompute") from e
  if out["mu"].ndim != 1 or out["sigma"].shape != out["mu"].shape * 2:
    raise FIDError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not fit")
  return out


def stats_dict(stats: RunningStats) -> dict:
  mu, sigma = stats.mean_cov()
  return {"mu": mu, "sigma": sigma, "features": stats.features, "num_images": stats.n}


def pad_to(images: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Pad a host batch to a multiple of `multiple` rows; returns (images, mask)."""
  n = images.shape[0]
  pad = (-n) % multiple
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  if pad:
    images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
  return images, mask


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.astype(np.float32) / 127.5 - 1.0
