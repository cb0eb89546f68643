"""VGG16 feature extractor and LPIPS (Zhang et al. 2018) with the shipped weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.ops import conv as fast_conv

# (block, number of 3x3 convs, width); features are taken after each block's last ReLU.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
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
  """x [B, H, W, 3] -> {'relu1_2': ..., ..., 'relu5_3': ...} (torchvision VGG16 convs)."""

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
    return feats


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
