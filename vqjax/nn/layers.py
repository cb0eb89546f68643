"""Convolutional building blocks shared by the VQGAN encoder and decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3, twice, with a 1x1 shortcut when width changes."""

  features: int
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
    h = nn.GroupNorm(self.norm_groups, name="norm1")(x)
    h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(swish(h))
    h = nn.GroupNorm(self.norm_groups, name="norm2")(h)
    h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(swish(h))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over all H*W positions, with residual."""

  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.norm_groups, name="norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="q")(y)
    k = nn.Dense(c, dtype=self.dtype, name="k")(y)
    v = nn.Dense(c, dtype=self.dtype, name="v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(c).astype(q.dtype)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", attn, v)
    y = nn.Dense(c, dtype=self.dtype, name="proj")(y)
    return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
  """Stride-2 conv3x3 with (0, 1) padding: H, W -> H/2, W/2."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(
        self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype
    )(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv3x3: H, W -> 2H, 2W."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return nn.Conv(self.features, (3, 3), dtype=self.dtype)(x)
