"""The tokenizer: encoder -> 1x1 -> quantiser -> 1x1 -> decoder (SPEC section 1).

Each of the three parts is chosen by name from its registry
(`config.model.encoder.name`, `.quantizer.name`, `.decoder.name`); the 1x1
convs map the encoder's `model.z_channels` to the quantiser's `embed_dim`
and back. The decoder receives the post-quant features and z_q itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from vqjax import registry
from vqjax.nn.layers import conv
from vqjax.nn.quantizers import QuantizerOutput


class VQGAN(nn.Module):
  """x [B, H, W, 3] in [-1, 1] -> (x_hat, QuantizerOutput); tokens [B, H/f, W/f(, c)]."""

  config: ml_collections.ConfigDict  # config.model

  def setup(self):
    m = self.config
    self.encoder = registry.ENCODERS.build(m.encoder, z_channels=m.z_channels)
    self.quant_conv = conv(m.quantizer.embed_dim, (1, 1))
    self.quantizer = registry.QUANTIZERS.build(m.quantizer)
    self.post_quant_conv = conv(m.z_channels, (1, 1))
    self.decoder = registry.DECODERS.build(m.decoder, out_channels=3)

  def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
    return self.quantizer(self.quant_conv(self.encoder(x)), train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q), z_q)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return self.decode(self.quantizer.decode_indices(indices))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
    q = self.encode(x, train=train)
    return self.decode(q.quantized), q
