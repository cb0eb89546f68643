"""The tokenizer: encoder -> 1x1 -> quantiser -> 1x1 -> decoder (SPEC section 1).

Each of the three parts is chosen by name from its registry
(`config.model.encoder.name`, `.quantizer.name`, `.decoder.name`); the 1x1
convs map the encoder's `model.z_channels` to the quantiser's `embed_dim`
and back. The decoder receives the post-quant features and z_q itself.

Mixed precision (`dtype`, the trainer's compute dtype from `config.precision`):
the encoder, post-quant conv and decoder compute in `dtype`; the quant conv
and the quantiser (distances, codebook, its updates) stay float32, because a
nearest-code search on bfloat16 features confuses codes closer than its
resolution; x_hat comes out float32 for the losses. `model.remat` reaches the
encoder and decoder (`vqjax.nn.layers.remat_block`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vqjax import registry
from vqjax.nn.layers import conv
from vqjax.nn.quantizers import QuantizerOutput


class VQGAN(nn.Module):
  """x [B, H, W, 3] in [-1, 1] -> (x_hat, QuantizerOutput); tokens [B, H/f, W/f(, c)]."""

  config: ml_collections.ConfigDict  # config.model
  dtype: jnp.dtype = jnp.float32  # compute dtype of the encoder and decoder

  def setup(self):
    m = self.config
    remat = m.get("remat", "none")
    self.encoder = registry.ENCODERS.build(m.encoder, z_channels=m.z_channels,
                                           **registry.ENCODERS.trainer_fields(
                                               m.encoder.name, dtype=self.dtype, remat=remat))
    self.quant_conv = conv(m.quantizer.embed_dim, (1, 1), dtype=jnp.float32)
    self.quantizer = registry.QUANTIZERS.build(m.quantizer)
    self.post_quant_conv = conv(m.z_channels, (1, 1), dtype=self.dtype)
    self.decoder = registry.DECODERS.build(m.decoder, out_channels=3,
                                           **registry.DECODERS.trainer_fields(
                                               m.decoder.name, dtype=self.dtype, remat=remat))

  def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
    return self.quantizer(self.quant_conv(self.encoder(x)), train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q), z_q).astype(jnp.float32)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return self.decode(self.quantizer.decode_indices(indices))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
    q = self.encode(x, train=train)
    return self.decode(q.quantized), q
