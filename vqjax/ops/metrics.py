"""Image quality metrics as pure functions (SPEC section 7).

Images are [B, H, W, C] in [-1, 1] unless a `data_range` says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Per-image PSNR in dB: 10 log10(R^2 / MSE). Returns [B]."""
  mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def gaussian_kernel_1d(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """Normalised 1D Gaussian taps; sigma 1.5 and truncate 3.5 give 11 taps."""
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _gaussian_filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable Gaussian filter over H and W of [B, H, W, C], 'valid' borders."""
  b, h, w, c = x.shape
  planes = x.transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
  kh = jnp.asarray(taps).reshape(-1, 1, 1, 1)
  kw = jnp.asarray(taps).reshape(1, -1, 1, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  planes = jax.lax.conv_general_dilated(planes, kh, (1, 1), "VALID", dimension_numbers=dn)
  planes = jax.lax.conv_general_dilated(planes, kw, (1, 1), "VALID", dimension_numbers=dn)
  hh, ww = planes.shape[1:3]
  return planes.reshape(b, c, hh, ww).transpose(0, 2, 3, 1)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0, sigma: float = 1.5) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004) with an 11-tap Gaussian window, sigma 1.5.

  Population (not sample) covariances, K1 = 0.01, K2 = 0.03, the SSIM map
  averaged over the valid interior and over channels. Returns [B].
  """
  taps = gaussian_kernel_1d(sigma)
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  mu_x = _gaussian_filter_valid(x, taps)
  mu_y = _gaussian_filter_valid(y, taps)
  var_x = _gaussian_filter_valid(x * x, taps) - mu_x**2
  var_y = _gaussian_filter_valid(y * y, taps) - mu_y**2
  cov = _gaussian_filter_valid(x * y, taps) - mu_x * mu_y
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))
