"""VQGAN convolutional decoder (SPEC section 1), registered as decoder 'vqgan'.

The decoder contract (every registered decoder keeps it):
- `__call__(h, z_q)`: h [B, h, w, z_channels] the post-quant features, z_q
  [B, h, w, d] the quantised codes (a decoder may condition on them, e.g.
  MoVQ's spatially conditional normalisation) -> x_hat [B, H, W, out_channels].
- `LAST_LAYER`: the name of its last layer's parameter subtree, whose input
  it sows as `intermediates/last_features`, and `last_layer()`: an unbound
  module equal to that layer, so the trainer can form the last layer's
  gradient for the adaptive GAN weight without a second pass.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.nn.encoders import check_widths
from vqjax.nn.layers import AttnBlock, ResBlock, Upsample, conv, group_norm, remat_block, swish


@registry.DECODERS.register("vqgan", not_config=("out_channels", "dtype", "remat"))
class Decoder(nn.Module):
  """(h [B, h, w, C], z_q) -> x_hat [B, h f, w f, out_channels]; z_q is not used.

  The tokenizer sets `out_channels`, `dtype` (the compute dtype, from
  `config.precision`; x_hat comes out in it) and `remat` (`model.remat`: 'block'
  recomputes every ResBlock and AttnBlock in the backward pass; `vqjax.nn.layers`).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  norm_groups: int = 32
  out_channels: int = 3
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  LAST_LAYER: ClassVar[str] = "conv_out"

  def last_layer(self) -> nn.Module:
    return conv(self.out_channels, (3, 3), dtype=self.dtype, parent=None)

  @staticmethod
  def check_config(cfg) -> None:
    """The widths (`check_widths`) and num_res_blocks >= 0."""
    check_widths("model.decoder", cfg.ch, cfg.ch_mult, cfg.norm_groups)
    check_fields(cfg, "model.decoder", {"num_res_blocks": ">=0"})

  def level_blocks(self, h: jax.Array, level: int) -> jax.Array:
    """Blocks added at up level `level`, after its ResBlocks/AttnBlocks and before its
    Upsample: none here, so 'vqgan' is the plain VQGAN decoder. A subclass (e.g. 'seqgan')
    overrides this, creating its submodules under names that none of the above use."""
    del level
    return h

  @nn.compact
  def __call__(self, z: jax.Array, z_q: jax.Array | None = None) -> jax.Array:
    res, attn = remat_block(ResBlock, self.remat), remat_block(AttnBlock, self.remat)
    width = self.ch * self.ch_mult[-1]
    h = conv(width, (3, 3), dtype=self.dtype, name="conv_in")(z)
    h = res(width, self.norm_groups, self.dtype, name="mid_res0")(h)
    h = attn(self.norm_groups, self.dtype, name="mid_attn")(h)
    h = res(width, self.norm_groups, self.dtype, name="mid_res1")(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = res(self.ch * self.ch_mult[level], self.norm_groups, self.dtype,
                name=f"up{level}_res{i}")(h)
        if h.shape[1] in self.attn_resolutions:
          h = attn(self.norm_groups, self.dtype, name=f"up{level}_attn{i}")(h)
      h = self.level_blocks(h, level)
      if level != 0:
        h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_sample")(h)
    h = swish(group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    self.sow("intermediates", "last_features", h)
    return conv(self.out_channels, (3, 3), dtype=self.dtype, name=self.LAST_LAYER)(h)
