"""FID, KID, precision/recall, IS and streaming statistics against closed forms and hand values."""

import numpy as np
import pytest
import scipy.linalg

from vqjax.eval import feature_stats as fs


def _random_cov(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_identical_statistics_is_zero(method):
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=32), _random_cov(rng, 32)
  assert abs(fs.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_diagonal_gaussians_equals_closed_form(method):
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  # Commuting covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fs.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_fid_of_rotated_gaussians_equals_closed_form():
  # S2 = R S1 R^T with R a rotation: the W2 distance between N(0, S1) and N(0, S2)
  # in 2D for S1 = diag(a, b), S2 = diag(b, a) (90 degrees) is (sqrt(a) - sqrt(b))^2 * 2.
  a, b = 4.0, 1.0
  got = fs.frechet_distance(np.zeros(2), np.diag([a, b]), np.zeros(2), np.diag([b, a]))
  np.testing.assert_allclose(got, 2 * (np.sqrt(a) - np.sqrt(b)) ** 2, rtol=1e-10)


def test_fid_general_covariances_both_methods_agree_with_symmetric_formula():
  rng = np.random.default_rng(2)
  s1, s2 = _random_cov(rng, 24), _random_cov(rng, 24, rank=10)  # one singular
  mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
  r = scipy.linalg.sqrtm(s1).real
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(r @ s2 @ r).real))
  for method in ("sqrtm", "eigh"):
    np.testing.assert_allclose(fs.frechet_distance(mu1, s1, mu2, s2, method=method), expected,
                               rtol=1e-6)


def test_fid_from_samples_approaches_the_closed_form():
  rng = np.random.default_rng(3)
  d, n = 8, 200_000
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  v1, v2 = np.linspace(0.5, 2, d), np.linspace(2, 0.5, d)
  x = mu1 + rng.normal(size=(n, d)) * np.sqrt(v1)
  y = mu2 + rng.normal(size=(n, d)) * np.sqrt(v2)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fs.frechet_distance(*fs.gaussian_stats(x), *fs.gaussian_stats(y))
  np.testing.assert_allclose(got, expected, rtol=0.02)


def test_fid_of_a_set_against_itself_is_zero():
  rng = np.random.default_rng(4)
  f = rng.normal(size=(300, 64)) ** 2
  stats = fs.RunningStats(64)
  for chunk in np.array_split(f, 7):
    stats.update(chunk)
  mu, sigma = stats.mean_cov()
  assert abs(fs.frechet_distance(mu, sigma, *fs.gaussian_stats(f))) < 1e-8


def test_fid_rejects_bad_statistics():
  eye = np.eye(2)
  with pytest.raises(fs.FIDError, match="imaginary"):
    fs.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), eye)  # not PSD
  with pytest.raises(fs.FIDError, match="do not match"):
    fs.frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3))
  with pytest.raises(fs.FIDError, match="NaN"):
    fs.frechet_distance(np.array([np.nan, 0]), eye, np.zeros(2), eye)


def test_running_stats_match_numpy_and_keep_at_most_max_features():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(103, 5)) * 100 + 1000  # a large mean stresses the one-pass formula
  stats = fs.RunningStats(5, max_features=50)
  for chunk in np.array_split(f, 4):
    stats.update(chunk)
  mu, sigma = stats.mean_cov()
  np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-8)
  assert stats.n == 103
  np.testing.assert_array_equal(stats.features, f[:50].astype(np.float32))
  with pytest.raises(fs.FIDError, match="non-finite"):
    stats.update(np.full((1, 5), np.inf))


def test_mmd2_unbiased_matches_a_double_loop():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(7, 4)), rng.normal(size=(9, 4)) + 0.3
  k = lambda a, b: (a @ b / 4 + 1) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  np.testing.assert_allclose(fs.mmd2_unbiased(x, y), xx + yy - 2 * xy, rtol=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
  same, same_std = fs.kernel_inception_distance(a, b, num_subsets=20, subset_size=300)
  assert abs(same) < 3 * same_std + 1e-3
  shifted, _ = fs.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=300)
  assert shifted > 0.1 and shifted > 20 * abs(same)


def test_precision_recall_by_hand():
  real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
  fake = np.array([[0.5], [2.5], [7.0], [20.0]])
  # 3rd-neighbour radii of the real points: 3, 2, 2, 2, 9 (point 10: 7, 8, 9, 10).
  # Fake 0.5 and 2.5 fall in the balls around 0..3, 7 in the ball around 10 (radius 9),
  # 20 in none: precision 3/4. The fake radii (19.5, 17.5, 13, 19.5) cover every real point.
  assert fs.precision_recall(real, fake, k=3) == (0.75, 1.0)
  assert fs.precision_recall(real, real, k=3) == (1.0, 1.0)
  assert fs.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)


def test_inception_score_by_hand():
  one_hot = np.eye(10)[np.arange(100) % 10]  # confident and spread evenly over 10 classes
  np.testing.assert_allclose(fs.inception_score(one_hot, num_splits=1)[0], 10.0, rtol=1e-9)
  collapsed = np.tile(np.eye(10)[:1], (100, 1))
  np.testing.assert_allclose(fs.inception_score(collapsed, num_splits=4)[0], 1.0)
  uniform = np.full((50, 10), 0.1)
  np.testing.assert_allclose(fs.inception_score(uniform, num_splits=2)[0], 1.0)
