"""VQGAN convolutional decoder (SPEC section 1)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.nn.layers import AttnBlock, ResBlock, Upsample, swish


class Decoder(nn.Module):
  """z_q [B, h, w, z_channels] -> x_hat [B, h f, w f, out_channels].

  The input to the last conv is sown as `intermediates/last_features`, so a
  caller can form the last layer's gradient for the adaptive GAN weight
  without a second pass through the network.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  out_channels: int = 3
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    width = self.ch * self.ch_mult[-1]
    h = nn.Conv(width, (3, 3), dtype=self.dtype, name="conv_in")(z)
    h = ResBlock(width, self.norm_groups, self.dtype, name="mid_res0")(h)
    h = AttnBlock(self.norm_groups, self.dtype, name="mid_attn")(h)
    h = ResBlock(width, self.norm_groups, self.dtype, name="mid_res1")(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[level], self.norm_groups, self.dtype,
                     name=f"up{level}_res{i}")(h)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.norm_groups, self.dtype, name=f"up{level}_attn{i}")(h)
      if level != 0:
        h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_sample")(h)
    h = swish(nn.GroupNorm(self.norm_groups, name="norm_out")(h))
    self.sow("intermediates", "last_features", h)
    return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
