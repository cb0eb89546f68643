"""BigGAN at 32x32 (Brock et al., 2019, "Large Scale GAN Training for High Fidelity Natural
Image Synthesis", Sec. 3 and appendix B), the baseline of FQ-GAN's CIFAR tables (SPEC
section 5), as BigGAN-PyTorch's `BigGAN.py` builds arch[32]:

  G: SN linear z -> 4x4x4ch; three GBlocks of 4ch (8, 16, 32 px); BN -> ReLU ->
     SN conv3x3 -> tanh. GBlock: cBN -> ReLU -> nearest x2 -> SN conv3x3 ->
     cBN -> ReLU -> SN conv3x3, plus nearest x2 -> SN conv1x1.
  D: four DBlocks of 4ch, average-pooled after the first two; ReLU, a sum over
     H and W, SN linear -> 1, plus the projection sum(SNEmbed(y) * h)
     (Miyato & Koyama, 2018, "cGANs with Projection Discriminator", Eq. 3).

Conditional BN without a shared embedding: gain 1 + E_g[y] and bias E_b[y]
from plain class embeddings [classes, channels] (BigGAN-PyTorch's `ccbn`).
Every conv, linear and embedding weight starts orthogonal on its [out, -1]
view ('ortho'), biases at zero. Spectral norm: `vqjax.nn.spectral_norm`.
G's statistics (BatchNorm running moments, SN vectors) live in 'gen_stats',
D's (SN vectors, FQ dictionaries) in 'disc_stats'; each changes only when the
call passes `train=True` and the collection is mutable. num_classes = 0 makes
both unconditional (plain BN in G, no projection in D).

The trainer sets two fields of G and D that are not config fields: `dtype`,
the compute dtype (`config.precision`: the convs and linears run in it; BN
moments, spectral norms, FQ dictionaries, D's final sum and linear, and G's
images stay float32), and `remat` (`model.remat`: 'block' recomputes every
GBlock and DBlock in the backward pass, `vqjax.nn.layers.remat_block`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.nn.discriminators import check_fq_config, fq_after_block
from vqjax.nn.layers import CHANNEL_AXES, named, remat_block, upsample_nearest
from vqjax.nn.spectral_norm import EMBED_AXES, ORTHO_EMBEDDING, SNConv, SNDense, SNEmbed

BOTTOM_WIDTH = 4  # G's first feature map is 4x4
D_DOWNSAMPLE = (True, True, False, False)  # arch[32]: average-pool after blocks 0 and 1


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and (biased) variance of x [B, H, W, C] over B, H, W."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  return mean, jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))


def running_moments(mean: jax.Array, var: jax.Array, batch_mean: jax.Array,
                    batch_var: jax.Array, count: int,
                    momentum: float) -> tuple[jax.Array, jax.Array]:
  """torch's BatchNorm update: running <- (1 - m) running + m batch, with the unbiased
  batch variance (count / (count - 1)) for the running variance."""
  unbiased = batch_var * (count / max(count - 1, 1))
  return ((1.0 - momentum) * mean + momentum * batch_mean,
          (1.0 - momentum) * var + momentum * unbiased)


def _check_labels(labels, num_classes: int, where: str) -> None:
  if num_classes and labels is None:
    raise ValueError(f"{where} is class-conditional (num_classes={num_classes}): pass labels "
                     "[B] int32, or set num_classes=0 for an unconditional model.")


class ConditionalBatchNorm(nn.Module):
  """BatchNorm with running statistics and a class-conditional gain and bias.

  num_classes > 0: gain 1 + E_g[y], bias E_b[y] (`gain`, `bias`: embeddings
  [classes, C]); num_classes = 0: a learned per-channel gain (ones) and bias
  (zeros), BigGAN-PyTorch's plain `bn`. train=True normalises with the batch's
  moments and, when `collection` is mutable, advances `mean`/`var` there as
  torch does (momentum 0.1, unbiased variance); train=False uses them. Moments
  and normalisation are float32; the output has x's dtype.
  """

  num_classes: int = 0
  eps: float = 1e-5
  momentum: float = 0.1
  collection: str = "gen_stats"

  def _gain_bias(self, labels, c: int) -> tuple[jax.Array, jax.Array]:
    if not self.num_classes:
      gain = self.param("gain", named(nn.initializers.ones, CHANNEL_AXES), (c,))
      return gain, self.param("bias", named(nn.initializers.zeros, CHANNEL_AXES), (c,))
    embed = functools.partial(nn.Embed, self.num_classes, c,
                              embedding_init=named(ORTHO_EMBEDDING, EMBED_AXES))
    gain = 1.0 + embed(name="gain")(labels)[:, None, None, :]
    return gain, embed(name="bias")(labels)[:, None, None, :]

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None, train: bool) -> jax.Array:
    _check_labels(labels, self.num_classes, "ConditionalBatchNorm")
    c, dtype = x.shape[-1], x.dtype
    x = x.astype(jnp.float32)
    ra_mean = self.variable(self.collection, "mean", named(jnp.zeros, CHANNEL_AXES), (c,))
    ra_var = self.variable(self.collection, "var", named(jnp.ones, CHANNEL_AXES), (c,))
    if train:
      mean, var = batch_moments(x)
      if self.is_mutable_collection(self.collection) and not self.is_initializing():
        ra_mean.value, ra_var.value = running_moments(ra_mean.value, ra_var.value, mean, var,
                                                      x.size // c, self.momentum)
    else:
      mean, var = ra_mean.value, ra_var.value
    gain, bias = self._gain_bias(labels, c)
    return ((x - mean) * jax.lax.rsqrt(var + self.eps) * gain + bias).astype(dtype)


class GBlock(nn.Module):
  """BigGAN-PyTorch's GBlock with nearest x2 upsampling and a learned 1x1 shortcut."""

  features: int
  num_classes: int
  bn_eps: float
  sn_eps: float
  collection: str = "gen_stats"

  @nn.compact
  def __call__(self, x: jax.Array, labels, train: bool) -> jax.Array:
    bn = functools.partial(ConditionalBatchNorm, self.num_classes, self.bn_eps,
                           collection=self.collection)
    sn_conv = functools.partial(SNConv, collection=self.collection, eps=self.sn_eps)
    h = upsample_nearest(nn.relu(bn(name="bn1")(x, labels, train)), 2)
    h = sn_conv(self.features, name="conv1")(h, update=train)
    h = nn.relu(bn(name="bn2")(h, labels, train))
    h = sn_conv(self.features, name="conv2")(h, update=train)
    shortcut = sn_conv(self.features, (1, 1), name="conv_sc")(upsample_nearest(x, 2),
                                                                update=train)
    return h + shortcut


@registry.GENERATORS.register("biggan32", not_config=("dtype", "remat"))
class BigGAN32Generator(nn.Module):
  """z [B, dim_z], labels [B] int32 (None when num_classes = 0) -> images [B, 32, 32, 3]
  in [-1, 1]. BigGAN-PyTorch's G at resolution 32 without shared embedding or
  hierarchical z; eps values of its train.py (BN 1e-5, SN 1e-8)."""

  resolution = 32  # not a field: the image size it makes

  num_classes: int = 0
  dim_z: int = 128
  ch: int = 64
  bn_eps: float = 1e-5
  sn_eps: float = 1e-8
  dtype: Any = jnp.float32
  remat: str = "none"

  @staticmethod
  def check_config(cfg, where: str = "model.generator") -> None:
    """num_classes >= 0, dim_z >= 1, ch >= 1, eps > 0."""
    check_fields(cfg, where, {"num_classes": ">=0", "dim_z": ">=1", "ch": ">=1",
                              "bn_eps": ">0", "sn_eps": ">0"})

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    _check_labels(labels, self.num_classes, "BigGAN32Generator")
    width, collection = 4 * self.ch, "gen_stats"
    h = SNDense(width * BOTTOM_WIDTH**2, collection=collection, eps=self.sn_eps,
                name="linear")(z.astype(self.dtype), update=train)
    # torch's view(B, C, 4, 4), then channels last
    h = h.reshape(z.shape[0], width, BOTTOM_WIDTH, BOTTOM_WIDTH).transpose(0, 2, 3, 1)
    block = remat_block(GBlock, self.remat, static_argnums=(3,))  # (self, x, labels, train)
    for i in range(3):
      h = block(width, self.num_classes, self.bn_eps, self.sn_eps, collection,
                name=f"block{i}")(h, labels, train)
    h = nn.relu(ConditionalBatchNorm(0, self.bn_eps, collection=collection,
                                     name="out_bn")(h, None, train))
    h = SNConv(3, collection=collection, eps=self.sn_eps, name="out_conv")(h, update=train)
    return jnp.tanh(h.astype(jnp.float32))


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2 (torch's AvgPool2d(2))."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DBlock(nn.Module):
  """BigGAN-PyTorch's (wide) DBlock: [ReLU ->] SN conv3x3 -> ReLU -> SN conv3x3 [-> pool],
  plus the shortcut, a learned SN conv1x1 where the width changes or it downsamples
  (pre-activated blocks: conv then pool; the first block: pool then conv)."""

  features: int
  downsample: bool
  preactivation: bool
  sn_eps: float
  collection: str = "disc_stats"

  def _shortcut(self, x: jax.Array, update: bool) -> jax.Array:
    if not (self.downsample or x.shape[-1] != self.features):
      return x
    sc = SNConv(self.features, (1, 1), collection=self.collection, eps=self.sn_eps,
                name="conv_sc")
    if self.preactivation:
      x = sc(x, update=update)
      return avg_pool2(x) if self.downsample else x
    return sc(avg_pool2(x) if self.downsample else x, update=update)

  @nn.compact
  def __call__(self, x: jax.Array, update: bool) -> jax.Array:
    sn_conv = functools.partial(SNConv, self.features, collection=self.collection,
                                eps=self.sn_eps)
    h = nn.relu(x) if self.preactivation else x
    h = sn_conv(name="conv1")(h, update=update)
    h = sn_conv(name="conv2")(nn.relu(h), update=update)
    if self.downsample:
      h = avg_pool2(h)
    return h + self._shortcut(x, update)


@registry.DISCRIMINATORS.register("biggan32", not_config=("dtype", "remat"))
class BigGAN32Discriminator(nn.Module):
  """x [B, 32, 32, 3], labels [B] int32 (None only when num_classes = 0) ->
  (logits [B], extra_losses). BigGAN-PyTorch's D at resolution 32 (blocks 0-3);
  FQ layers after any of them (`vqjax.nn.discriminators`; FQ-GAN's released
  code places them after every block)."""

  num_classes: int = 0
  ch: int = 64
  sn_eps: float = 1e-8
  fq_layers: tuple[int, ...] = ()
  fq_log2_size: int = 10
  fq_alpha: float = 1.0
  fq_beta: float = 0.25
  fq_decay: float = 0.9
  fq_propagate: bool = True
  dtype: Any = jnp.float32
  remat: str = "none"

  @staticmethod
  def check_config(cfg, where: str = "disc") -> None:
    """num_classes >= 0, ch >= 1, sn_eps > 0, and the FQ fields (blocks 0-3)."""
    check_fields(cfg, where, {"num_classes": ">=0", "ch": ">=1", "sn_eps": ">0"})
    check_fq_config(cfg, where, len(D_DOWNSAMPLE))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               labels: jax.Array | None = None) -> tuple[jax.Array, dict]:
    _check_labels(labels, self.num_classes, "BigGAN32Discriminator")
    width, h, extra = 4 * self.ch, x.astype(self.dtype), {}
    block = remat_block(DBlock, self.remat, static_argnums=(2,))  # (self, x, update)
    for i, down in enumerate(D_DOWNSAMPLE):
      h = block(width, down, i > 0, self.sn_eps, name=f"block{i}")(h, train)
      h, losses = fq_after_block(self, i, h, train)
      extra.update(losses)
    h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
    logits = SNDense(1, eps=self.sn_eps, name="linear")(h, update=train)[:, 0]
    if self.num_classes:
      embed = SNEmbed(self.num_classes, width, eps=self.sn_eps, name="embed")
      logits = logits + jnp.sum(embed(labels, update=train) * h, axis=-1)
    return logits, extra
