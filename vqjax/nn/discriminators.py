"""PatchGAN discriminator (pix2pix / VQGAN NLayerDiscriminator, SPEC section 1).

The discriminator contract (every registered discriminator keeps it):
`__call__(x, train)` -> (logits, extra_losses) with `extra_losses` a dict of
scalars the trainer adds to the discriminator's loss (e.g. a quantisation
loss inside the discriminator); statistics a discriminator keeps live in the
mutable collection `disc_stats` and change only when the caller makes it
mutable and passes `train=True`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.nn.layers import CHANNEL_AXES, conv, named


class BatchStatNorm(nn.Module):
  """Batch normalisation with the statistics of the current batch, scale and bias.

  The discriminator is only ever run in training, where batch norm uses the
  batch's own mean and variance; it keeps no running averages because nothing
  would read them. Under a sharded jit the batch is global, so the moments
  are taken over the whole global batch.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    scale = self.param("scale", named(nn.initializers.ones, CHANNEL_AXES), (c,))
    bias = self.param("bias", named(nn.initializers.zeros, CHANNEL_AXES), (c,))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


@registry.DISCRIMINATORS.register("patchgan")
class PatchDiscriminator(nn.Module):
  """x [B, H, W, 3] -> (patch logits [B, H', W', 1], {}).

  conv4x4/2 -> LReLU, then (num_layers - 1) conv4x4/2 -> BN -> LReLU, one
  conv4x4/1 -> BN -> LReLU, and a conv4x4/1 to one channel.
  """

  ndf: int = 64
  num_layers: int = 3

  @staticmethod
  def check_config(cfg) -> None:
    """ndf >= 1 and num_layers >= 1."""
    check_fields(cfg, "disc", {"ndf": ">=1", "num_layers": ">=1"})

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
    init = nn.initializers.normal(0.02)
    h = conv(self.ndf, (4, 4), strides=(2, 2), padding=1, kernel_init=init)(x)
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(self.ndf * min(2**n, 8), (4, 4), strides=(stride, stride), padding=1,
               use_bias=False, kernel_init=init)(h)
      h = nn.leaky_relu(BatchStatNorm()(h), 0.2)
    return conv(1, (4, 4), strides=(1, 1), padding=1, kernel_init=init)(h), {}
