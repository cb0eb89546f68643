"""VGG16 (Simonyan & Zisserman 2015, torchvision's layout): features, classifier, LPIPS; VGG19.

`VGG16Features` gives the ReLU outputs of the 13 convolutions; `VGG16` adds
the classifier (fc6-fc8 on a 7x7 adaptive average pool of pool5, as
torchvision) for the `logit` feature of SeQ-GAN's semantic-enhanced
perceptual loss (Sec. 3.3.2); `LPIPS` is Zhang et al. 2018's distance.
`VGG19` (Keras' layout and preprocessing, `keras_vgg_preprocess`) gives the
features of Reg-VQ's contrastive losses (Sec. 3.3).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax.ops import conv as fast_conv

# (block, number of 3x3 convs, width); features are taken after each block's last ReLU.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
VGG16_LAYERS = tuple(f"relu{b}_{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1))
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LOGIT = "logit"  # the classifier's output before the softmax
CLASSIFIER_POOL = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before fc6
# LPIPS input normalisation for images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pool with stride 2 (torch's MaxPool2d(2, 2): an odd last row/column is
  dropped), as a reshape and a max, which XLA runs faster than a reduce-window.

  Values equal `nn.max_pool(x, (2, 2), strides=(2, 2))`; so do the gradients
  except where a window holds tied maxima (split among them here, all to one
  there), which after a ReLU happens only for windows of zeros, whose
  gradient the ReLU zeroes anyway.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
  """x [B, H, W, 3] -> {'relu1_1': ..., ..., 'relu5_3': ...} (torchvision VGG16 convs).

  Computes up to and including the layer `last` (a name in VGG16_LAYERS) and
  returns every ReLU output up to it.
  """

  last: str = "relu5_3"

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    feats = {}
    for block, num_convs, width in VGG16_BLOCKS:
      if block > 1:
        x = max_pool_2x2(x)
      for i in range(1, num_convs + 1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"conv{block}_{i}",
                            conv_general_dilated=fast_conv.conv_general_dilated)(x))
        feats[f"relu{block}_{i}"] = x
        if f"relu{block}_{i}" == self.last:
          return feats
    return feats


def adaptive_avg_pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size]: row i averages inputs floor(i size / out) .. ceil((i + 1) size / out) - 1,
  the windows of torch's AdaptiveAvgPool (overlapping when out does not divide size,
  repeated when out > size)."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """[B, H, W, C] -> [B, out, out, C], torch's AdaptiveAvgPool2d((out, out))."""
  rows = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], out))
  cols = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], out))
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


class VGG16Classifier(nn.Module):
  """pool5 [B, h, w, 512] -> logits [B, num_classes]: adaptive 7x7 average pool,
  flatten, fc6 -> ReLU -> fc7 -> ReLU -> fc8 (torchvision's classifier, dropout off).

  The flatten is position-major, channel-minor (NHWC); torchvision flattens
  channel-major, so its fc6 weights are permuted when read
  (`vqjax.weights.vgg16_classifier`).
  """

  hidden: int = 4096
  num_classes: int = 1000

  @nn.compact
  def __call__(self, pool5: jax.Array) -> jax.Array:
    x = adaptive_avg_pool(pool5, CLASSIFIER_POOL).reshape(pool5.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="fc6")(x))
    x = nn.relu(nn.Dense(self.hidden, name="fc7")(x))
    return nn.Dense(self.num_classes, name="fc8")(x)


class VGG16(nn.Module):
  """x [B, H, W, 3] (ImageNet-normalised) -> {layer: features} for each name in `layers`:
  ReLU outputs (VGG16_LAYERS) and `logit`. Runs only as deep as the deepest layer asked."""

  layers: Sequence[str] = LPIPS_LAYERS
  hidden: int = 4096
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    wants_logit = LOGIT in self.layers
    relus = [name for name in self.layers if name != LOGIT]
    last = "relu5_3" if wants_logit else max(relus, key=VGG16_LAYERS.index)
    feats = VGG16Features(last=last, name="vgg")(x)
    out = {name: feats[name] for name in relus}
    if wants_logit:
      out[LOGIT] = VGG16Classifier(self.hidden, self.num_classes, name="classifier")(
          max_pool_2x2(feats["relu5_3"]))
    return out


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance: per layer, unit-normalise channels, squared difference,
  a learned non-negative 1x1 weighting, spatial mean; summed over the five
  VGG16 layers. Inputs in [-1, 1]; returns [B]."""

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift = jnp.asarray(LPIPS_SHIFT)
    scale = jnp.asarray(LPIPS_SCALE)
    vgg = VGG16Features(name="vgg")
    fx = vgg((x - shift) / scale)
    fy = vgg((y - shift) / scale)
    total = 0.0
    for i, layer in enumerate(LPIPS_LAYERS):
      d = jnp.square(_unit_normalize(fx[layer]) - _unit_normalize(fy[layer]))
      w = self.param(f"lin{i}", nn.initializers.ones, (d.shape[-1],))
      total = total + jnp.mean(d @ w, axis=(1, 2))
    return total


# VGG19 (Keras' `vgg19` application, the original Caffe weights): features for Reg-VQ's
# contrastive losses (`vqjax.losses.contrastive`).
VGG19_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))
VGG19_LAYERS = tuple(f"relu{b}_{i}" for b, n, _ in VGG19_BLOCKS for i in range(1, n + 1))
# Reg-VQ (Sec. 3.3) lists relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the last ReLU of each
# block in VGG16's numbering; VGG19's blocks 3-5 have four convolutions, so their last ReLUs
# are relu3_4, relu4_4, relu5_4 (relu3_3 etc. would be a layer inside the block).
VGG19_BLOCK_ENDS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
# Keras' 'caffe' preprocessing: the ImageNet mean pixel on the 0-255 scale, in BGR order.
KERAS_BGR_MEAN = (103.939, 116.779, 123.68)


def keras_vgg_preprocess(x: jax.Array) -> jax.Array:
  """RGB images in [-1, 1] -> the input of Keras' VGG19 (`preprocess_input`, mode 'caffe'):
  scaled to [0, 255], channels reversed to BGR, the BGR mean pixel subtracted."""
  bgr = ((jnp.asarray(x) + 1.0) * 127.5)[..., ::-1]
  return bgr - jnp.asarray(KERAS_BGR_MEAN, bgr.dtype)


class VGG19(nn.Module):
  """x [B, H, W, 3] (`keras_vgg_preprocess`ed) -> {layer: ReLU output} for each name of
  `layers` (in VGG19_LAYERS).

  Keras' VGG19 without its classifier: five blocks of 3x3 convolutions (zero
  'same' padding, stride 1) each followed by a ReLU, with a 2x2 max pool of
  stride 2 between blocks ('valid': an odd last row/column is dropped). The
  convolutions are named `conv{block}_{i}` (Keras: `block{block}_conv{i}`).
  Runs only as deep as the deepest layer asked, so only those convolutions
  have parameters.
  """

  layers: Sequence[str] = VGG19_BLOCK_ENDS

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    unknown = [name for name in self.layers if name not in VGG19_LAYERS]
    if unknown or not self.layers:
      raise ValueError(f"VGG19 layers {tuple(self.layers)}: choose a non-empty subset of "
                       f"{VGG19_LAYERS}.")
    last = max(self.layers, key=VGG19_LAYERS.index)
    out = {}
    for block, num_convs, width in VGG19_BLOCKS:
      if block > 1:
        x = max_pool_2x2(x)
      for i in range(1, num_convs + 1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"conv{block}_{i}",
                            conv_general_dilated=fast_conv.conv_general_dilated)(x))
        name = f"relu{block}_{i}"
        if name in self.layers:
          out[name] = x
        if name == last:
          return out
    return out
