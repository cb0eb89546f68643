"""PSNR and SSIM against scikit-image on the same images."""

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqjax.ops.metrics import psnr, ssim


def _pair():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 40, 36, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  return x, y


def test_psnr_matches_skimage():
  x, y = _pair()
  for i in range(2):
    ref = peak_signal_noise_ratio(x[i], y[i], data_range=2.0)
    np.testing.assert_allclose(psnr(x, y)[i], ref, rtol=1e-5)


def test_ssim_matches_skimage_gaussian_window():
  x, y = _pair()
  for i in range(2):
    ref = structural_similarity(x[i], y[i], data_range=2.0, channel_axis=-1,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(ssim(x, y)[i], ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-5)
