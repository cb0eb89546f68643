"""The VQGAN tokenizer: encoder -> 1x1 -> quantiser -> 1x1 -> decoder (SPEC section 1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from vqjax.nn.decoders import Decoder
from vqjax.nn.encoders import Encoder
from vqjax.nn.quantizers import QuantizerOutput, build_quantizer


class VQGAN(nn.Module):
  """x [B, H, W, 3] in [-1, 1] -> (x_hat, QuantizerOutput); tokens [B, H/f, W/f]."""

  config: ml_collections.ConfigDict  # config.model

  def setup(self):
    m = self.config
    arch = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), norm_groups=m.norm_groups)
    self.encoder = Encoder(z_channels=m.z_channels, **arch)
    self.quant_conv = nn.Conv(m.quantizer.embed_dim, (1, 1))
    self.quantizer = build_quantizer(m.quantizer)
    self.post_quant_conv = nn.Conv(m.z_channels, (1, 1))
    self.decoder = Decoder(out_channels=3, **arch)

  def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
    return self.quantizer(self.quant_conv(self.encoder(x)), train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q))

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return self.decode(self.quantizer.decode_indices(indices))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
    q = self.encode(x, train=train)
    return self.decode(q.quantized), q
