"""VQGAN convolutional encoder (SPEC section 1), registered as encoder 'vqgan'."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.errors import ConfigError
from vqjax.nn.layers import (
  AttnBlock,
  Downsample,
  ResBlock,
  conv,
  group_norm,
  remat_block,
  swish,
)


def check_widths(where: str, ch: int, ch_mult: Sequence[int], norm_groups: int) -> None:
  """Positive ch, norm_groups and multipliers, and GroupNorm(norm_groups) dividing every
  level's width ch * mult (and ch)."""
  check_fields({"ch": ch, "norm_groups": norm_groups}, where,
               {"ch": ">=1", "norm_groups": ">=1"})
  if not ch_mult or min(ch_mult) < 1:
    raise ConfigError(f"{where}.ch_mult={tuple(ch_mult)} must be a non-empty sequence of "
                      "channel multipliers >= 1, one per resolution level.")
  widths = [ch * k for k in ch_mult] + [ch]
  bad = [w for w in widths if w % norm_groups]
  if bad:
    raise ConfigError(f"{where}.norm_groups={norm_groups} does not divide channel width "
                      f"{bad[0]} ({where}.ch={ch}, ch_mult={tuple(ch_mult)}).")


@registry.ENCODERS.register("vqgan", not_config=("z_channels", "dtype", "remat"))
class Encoder(nn.Module):
  """x [B, H, W, 3] -> z [B, H/f, W/f, z_channels], f = 2^(len(ch_mult) - 1).

  The tokenizer sets `z_channels` (its `model.z_channels`), `dtype` (from
  `config.precision`) and `remat` (`model.remat`: 'block' recomputes every
  ResBlock and AttnBlock in the backward pass; `vqjax.nn.layers`); the other
  fields are the config's `model.encoder`.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  norm_groups: int = 32
  z_channels: int = 256
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  @staticmethod
  def downsampling(cfg) -> int:
    """The factor f from the encoder's config."""
    return 2 ** (len(cfg.ch_mult) - 1)

  @staticmethod
  def check_config(cfg) -> None:
    """The widths (`check_widths`) and num_res_blocks >= 0."""
    check_widths("model.encoder", cfg.ch, cfg.ch_mult, cfg.norm_groups)
    check_fields(cfg, "model.encoder", {"num_res_blocks": ">=0"})

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res, attn = remat_block(ResBlock, self.remat), remat_block(AttnBlock, self.remat)
    h = conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res(self.ch * mult, self.norm_groups, self.dtype, name=f"down{level}_res{i}")(h)
        if h.shape[1] in self.attn_resolutions:
          h = attn(self.norm_groups, self.dtype, name=f"down{level}_attn{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(h.shape[-1], self.dtype, name=f"down{level}_sample")(h)
    width = h.shape[-1]
    h = res(width, self.norm_groups, self.dtype, name="mid_res0")(h)
    h = attn(self.norm_groups, self.dtype, name="mid_attn")(h)
    h = res(width, self.norm_groups, self.dtype, name="mid_res1")(h)
    h = swish(group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    return conv(self.z_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
