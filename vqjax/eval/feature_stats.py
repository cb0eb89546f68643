"""Distribution metrics on feature vectors (SPEC section 7), NumPy/SciPy in float64.

* `frechet_distance`: FID between Gaussians (mu1, S1) and (mu2, S2),
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017).
* `kernel_inception_distance`: KID, the unbiased MMD^2 with the polynomial
  kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
  (Binkowski et al. 2018).
* `precision_recall`: k-NN manifold precision and recall (Kynkaanniemi et
  al. 2019), k = 3.
* `inception_score`: exp(E_x KL(p(y|x) || p(y))) over splits (Salimans et
  al. 2016); the class probabilities come from pytorch-fid's Inception file
  (`vqjax.weights.inception_logits`), the shipped FID file has no head.
* `RunningStats`: streaming mean and covariance (float64 sums), keeping up to
  `max_features` raw features for KID and precision/recall.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from vqjax.errors import UserError


class FIDError(UserError, ValueError):
  """Statistics FID cannot be computed from; the message says what to do."""


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "sqrtm", eps: float = 1e-6,
                     max_imag: float = 1e-3) -> float:
  """Frechet distance between two Gaussians, in float64.

  `method='sqrtm'` takes SciPy's matrix square root of S1 S2. If the result
  is not finite (a singular product), `eps` is added to both diagonals and it
  is retried. The imaginary part that round-off leaves on the diagonal must
  be below `max_imag` (relative to the trace's magnitude, at least 1), or the
  statistics are rejected. `method='eigh'` uses the identity
  tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), symmetric
  eigendecompositions only: real by construction and ~6x faster at d = 2048.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
                   f"vs {s2.shape}; were both computed with the same feature extractor?")
  if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, s1, s2)):
    raise FIDError("statistics contain NaN or inf: the features were not finite; check the "
                   "images (NaN pixels?) and recompute the statistics")
  diff = mu1 - mu2
  if method == "sqrtm":
    # Fewer samples than dimensions make S1 S2 singular and SciPy warn; the result is still
    # checked below (finite, small imaginary residue), which is the test that matters.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      covmean = scipy.linalg.sqrtm(s1 @ s2)
      if not np.all(np.isfinite(covmean)):
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
      imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
      scale = max(1.0, abs(float(np.trace(covmean).real)))
      if imag > max_imag * scale:
        raise FIDError(
            f"the matrix square root has an imaginary diagonal residue of {imag:.3g}: the "
            "covariances are too ill-conditioned for sqrtm; use more samples, or "
            "method='eigh'")
      covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
  elif method == "eigh":
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0,
                                              None))))
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigh', not {method!r}")
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, unbiased covariance) of [N, D] features, float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise FIDError(f"need at least 2 feature vectors of shape [N, D], got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _poly_kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 with the cubic polynomial kernel; x: [m, D], y: [n, D]."""
  m, n = x.shape[0], y.shape[0]
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kernel_inception_distance(features_a, features_b, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID: (mean, std) of unbiased MMD^2 over `num_subsets` random subsets of each set.

  Subsets are drawn without replacement within a subset; their size is
  min(subset_size, len(a), len(b)), at least 2.
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  size = min(subset_size, a.shape[0], b.shape[0])
  if size < 2:
    raise FIDError(f"KID needs at least 2 features per set, got {a.shape[0]} and {b.shape[0]}")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)],
                          b[rng.choice(b.shape[0], size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def _pairwise_sq_dists(x, y, block: int = 2048):
  out = np.empty((x.shape[0], y.shape[0]), np.float64)
  yy = np.sum(y * y, axis=1)
  for i in range(0, x.shape[0], block):
    xb = x[i:i + block]
    out[i:i + block] = np.maximum(np.sum(xb * xb, axis=1)[:, None] + yy[None] - 2 * xb @ y.T, 0)
  return out


def _knn_radii(x, k: int):
  d = _pairwise_sq_dists(x, x)
  # Column 0 of each sorted row is the point itself (distance 0).
  return np.sort(d, axis=1)[:, k]


def _coverage(points, manifold, radii) -> float:
  """Fraction of `points` inside some ball (manifold_i, radius_i)."""
  d = _pairwise_sq_dists(points, manifold)
  return float(np.mean(np.any(d <= radii[None, :], axis=1)))


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall: each set's manifold is the union of k-NN balls.

  precision = fraction of fake samples inside the real manifold,
  recall = fraction of real samples inside the fake manifold.
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if min(real.shape[0], fake.shape[0]) <= k:
    raise FIDError(f"precision/recall with k={k} needs more than {k} samples per set")
  precision = _coverage(fake, real, _knn_radii(real, k))
  recall = _coverage(real, fake, _knn_radii(fake, k))
  return precision, recall


def inception_score(probs, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over splits of exp(mean_x KL(p(y|x) || p(y))); probs: [N, classes]."""
  p = np.asarray(probs, np.float64)
  scores = []
  for part in np.array_split(p, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(np.maximum(part, 1e-30)) - np.log(np.maximum(marginal, 1e-30))),
                axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def inception_score_splits(n: int, num_splits: int = 10) -> int:
  """Splits for `n` images: `num_splits` (10, as Salimans et al. 2016) when every split gets
  at least 2 images, else n // 2 (each split's marginal then averages 2 or 3 images), and 1
  for a single image (whose score is exp(0) = 1)."""
  return max(1, min(num_splits, n // 2))


class RunningStats:
  """Streaming sums for mean/covariance (float64) plus up to `max_features` raw features."""

  def __init__(self, dim: int, max_features: int = 50_000):
    self.n = 0
    self.sum = np.zeros(dim, np.float64)
    self.sum_outer = np.zeros((dim, dim), np.float64)
    self.max_features = max_features
    self._kept: list[np.ndarray] = []
    self._kept_n = 0

  def update(self, features) -> None:
    f = np.asarray(features, np.float64)
    if f.size == 0:
      return
    if not np.all(np.isfinite(f)):
      raise FIDError("non-finite Inception features: the images contain NaN or inf values")
    self.n += f.shape[0]
    self.sum += f.sum(axis=0)
    self.sum_outer += f.T @ f
    room = self.max_features - self._kept_n
    if room > 0:
      self._kept.append(np.asarray(features, np.float32)[:room])
      self._kept_n += min(room, f.shape[0])

  @property
  def features(self) -> np.ndarray:
    if not self._kept:
      return np.zeros((0, self.sum.shape[0]), np.float32)
    return np.concatenate(self._kept)

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise FIDError(f"FID needs at least 2 images, got {self.n}")
    mu = self.sum / self.n
    cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, (cov + cov.T) / 2
