"""VQGAN convolutional encoder (SPEC section 1)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.nn.layers import AttnBlock, Downsample, ResBlock, swish


class Encoder(nn.Module):
  """x [B, H, W, 3] -> z [B, H/f, W/f, z_channels], f = 2^(len(ch_mult) - 1)."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  z_channels: int = 256
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.norm_groups, self.dtype, name=f"down{level}_res{i}")(h)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.norm_groups, self.dtype, name=f"down{level}_attn{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(h.shape[-1], self.dtype, name=f"down{level}_sample")(h)
    width = h.shape[-1]
    h = ResBlock(width, self.norm_groups, self.dtype, name="mid_res0")(h)
    h = AttnBlock(self.norm_groups, self.dtype, name="mid_attn")(h)
    h = ResBlock(width, self.norm_groups, self.dtype, name="mid_res1")(h)
    h = swish(nn.GroupNorm(self.norm_groups, name="norm_out")(h))
    return nn.Conv(self.z_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
