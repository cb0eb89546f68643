"""Convolutional building blocks shared by the VQGAN encoder and decoder.

Every parameter of the tokenizer side carries logical axis names
(`flax.linen.with_logical_partitioning`), which the rules in `config.mesh`
map to mesh axes (`vqjax.core.partitioning.param_shardings`):

| parameter                      | logical axes                                          |
|--------------------------------|-------------------------------------------------------|
| conv kernel [kh, kw, in, out]  | (conv_height, conv_width, conv_in, conv_out)          |
| conv bias, norm scale/bias [C] | (conv_out,): the channel axis of the activations      |
| dense kernel [in, out]         | (embed_in, embed_out); its bias (embed_out,)          |
| codebook-like [K, d]           | (codes, code_dim); per-code statistics (codes,)       |

`conv`, `dense` and `group_norm` build the Flax layers with these names and
Flax's default initialisers, so parameters and their values are those of
plain `nn.Conv` / `nn.Dense` / `nn.GroupNorm`.

Mixed precision and rematerialisation (the trainers pass both to the parts
that take them, from `config.precision` and `config.model.remat`):

- `dtype` (`compute_dtype`): the dtype convs, dense layers and attention
  compute in, and the activations flow in; parameters stay float32
  (`param_dtype`). Normalisations compute their mean and variance in float32
  whatever their `dtype` (Flax promotes the statistics to at least float32),
  and attention takes its softmax in float32.
- `remat` ('none' | 'block', `remat_block`): 'block' wraps each residual or
  attention block in `nn.remat`, so its activations are recomputed in the
  backward pass instead of kept; the parameter tree is the same either way.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.errors import ConfigError
from vqjax.ops import conv as fast_conv

CONV_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
CHANNEL_AXES = ("conv_out",)
DENSE_KERNEL_AXES = ("embed_in", "embed_out")
CODEBOOK_AXES = ("codes", "code_dim")
CODE_AXES = ("codes",)

_kernel_init = nn.initializers.lecun_normal()  # Flax's default for Conv and Dense

# `config.precision` -> the compute dtype; `config.model.remat` choices.
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_CHOICES = ("none", "block")


def compute_dtype(precision: str) -> jnp.dtype:
  """The dtype `config.precision` computes in (ConfigError for an unknown value)."""
  if precision not in PRECISIONS:
    raise ConfigError(f"precision={precision!r} must be one of {tuple(PRECISIONS)}.")
  return PRECISIONS[precision]


@functools.lru_cache(maxsize=None)
def remat_block(block: type[nn.Module], remat: str,
                static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """The module class to build a block with under `remat`: `block` itself for 'none',
  `nn.remat(block)` for 'block' (recomputed in the backward pass; same fields, and the
  same parameter names for the same `name`).

  `static_argnums` are the positions (self = 0) of `__call__` arguments that are Python
  values, not arrays (e.g. a `train` flag).
  """
  if remat == "none":
    return block
  if remat == "block":
    return nn.remat(block, static_argnums=static_argnums)
  raise ConfigError(f"model.remat={remat!r} must be one of {REMAT_CHOICES}.")


def named(init, axes: Sequence[str | None]):
  """`init` whose result is boxed with the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


def conv(features: int, kernel_size: Sequence[int], kernel_init=_kernel_init,
         **kwargs) -> nn.Conv:
  """A 2-D `nn.Conv` whose kernel and bias carry logical axis names.

  It computes through `vqjax.ops.conv.conv_general_dilated` (equal to the lax
  convolution; a patch product where XLA's convolution is slow).
  """
  if len(kernel_size) != 2:
    raise ValueError(f"conv takes a 2-D kernel size, got {tuple(kernel_size)}")
  kwargs.setdefault("conv_general_dilated", fast_conv.conv_general_dilated)
  return nn.Conv(features, tuple(kernel_size), kernel_init=named(kernel_init, CONV_KERNEL_AXES),
                 bias_init=named(nn.initializers.zeros, CHANNEL_AXES), **kwargs)


def dense(features: int, in_axis: str = "embed_in", out_axis: str = "embed_out",
          **kwargs) -> nn.Dense:
  """`nn.Dense` with kernel axes (in_axis, out_axis) and bias axis (out_axis,)."""
  return nn.Dense(features, kernel_init=named(_kernel_init, (in_axis, out_axis)),
                  bias_init=named(nn.initializers.zeros, (out_axis,)), **kwargs)


def group_norm(num_groups: int, **kwargs) -> nn.GroupNorm:
  """`nn.GroupNorm` whose scale and bias carry the channel axis name."""
  return nn.GroupNorm(num_groups, scale_init=named(nn.initializers.ones, CHANNEL_AXES),
                      bias_init=named(nn.initializers.zeros, CHANNEL_AXES), **kwargs)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3, twice, with a 1x1 shortcut when width changes.

  `norm(num_groups, dtype=..., name=...)` builds each normalisation (default `group_norm`);
  a conditional one (e.g. MoVQ's SpatialNorm) gets the block's extra call
  arguments `cond` as well: `ResBlock(..., norm=SpatialNorm)(x, z_q)`.
  """

  features: int
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  norm: Callable[..., nn.Module] = group_norm

  @nn.compact
  def __call__(self, x: jax.Array, *cond: jax.Array) -> jax.Array:  # x: [B, H, W, C]
    h = self.norm(self.norm_groups, dtype=self.dtype, name="norm1")(x, *cond)
    h = conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(swish(h))
    h = self.norm(self.norm_groups, dtype=self.dtype, name="norm2")(h, *cond)
    h = conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(swish(h))
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), dtype=self.dtype, name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over all H*W positions, with residual; `norm`
  and `cond` as in ResBlock."""

  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  norm: Callable[..., nn.Module] = group_norm

  @nn.compact
  def __call__(self, x: jax.Array, *cond: jax.Array) -> jax.Array:  # x: [B, H, W, C]
    b, h, w, c = x.shape
    y = self.norm(self.norm_groups, dtype=self.dtype, name="norm")(x, *cond)
    y = y.reshape(b, h * w, c)
    q = dense(c, dtype=self.dtype, name="q")(y)
    k = dense(c, dtype=self.dtype, name="k")(y)
    v = dense(c, dtype=self.dtype, name="v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(c).astype(q.dtype)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", attn, v)
    y = dense(c, dtype=self.dtype, name="proj")(y)
    return x + y.reshape(b, h, w, c)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """[B, H, W, C] -> [B, fH, fW, C], each pixel repeated f x f times (nearest neighbour).

  A broadcast and a reshape: `jax.image.resize(method="nearest")` gives the same
  values but builds index arrays and a gather, which costs more on CPU.
  """
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


class Downsample(nn.Module):
  """Stride-2 conv3x3 with (0, 1) padding: H, W -> H/2, W/2."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(
        self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype
    )(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv3x3: H, W -> 2H, 2W."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = upsample_nearest(x, 2)
    return conv(self.features, (3, 3), dtype=self.dtype)(x)
