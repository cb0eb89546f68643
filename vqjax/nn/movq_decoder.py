"""MoVQ's modulated decoder (Zheng et al. 2022, Sec. 3.1, Eq. 4), registered as decoder 'movq'.

The VQGAN decoder ('vqgan', `vqjax.nn.decoders.Decoder`) whose normalisations
in its first `spatial_norm_blocks` blocks are spatially conditional
normalisations (`SpatialNorm`, Eq. 4) of the quantised codes z_q:

    F_out = phi_gamma(z_q) * GroupNorm(F) + phi_beta(z_q),

phi_gamma and phi_beta 1x1 convolutions (with bias) of z_q brought to F's
resolution by nearest-neighbour upsampling (Sec. 3.1: "the output of phi_gamma
and phi_beta hold the same resolution to the current activation").

Blocks. The decoder's blocks, in call order, are

    mid_res0, mid_attn, mid_res1,                      (the middle, at the latent size)
    up{L-1}_res0, ..., up{L-1}_res{R}, ..., up0_res0, ..., up0_res{R},
    norm_out,

L = len(ch_mult), R = num_res_blocks: 3 + L (R + 1) + 1 blocks, a number fixed
by the fields alone. A block's normalisations are a ResBlock's norm1 and norm2;
an AttnBlock's norm (mid_attn); for up{level}_res{i}, also the norm of the
attention block up{level}_attn{i} that follows it where that level's map size
is in `attn_resolutions` (so which blocks are conditioned never depends on the
image size, only how many SpatialNorm modules they hold); norm_out's is the
output GroupNorm. The Upsample convolutions hold no normalisation and are not
blocks. `spatial_norm_blocks=3` (the default) conditions the three middle
blocks, the paper's "we applied the new normalization layer in the first three
blocks of the decoder" (Sec. 4.2, implementation details); 'all' conditions every
block, norm_out included (ai-forever/MoVQGAN's decoder does this), and equals
the number of blocks.

The config field holds an int or 'all'. Its default is a
`ml_collections.FieldReference` of type object (`spatial_norm_blocks_field`),
so that ConfigDict's type check lets a recipe assign either and
`--config.model.decoder.spatial_norm_blocks=all` (or `=5`) parses from the
command line (ml_collections parses a field of type object as a Python literal,
else a string). A recipe that sets another default and wants the command line
to keep both forms passes `spatial_norm_blocks=spatial_norm_blocks_field(k)`.

The initial feature F^0 (Sec. 3.1 after Eq. 4; Sec. 4.4, Fig. 6a), by `f0`, is
conv_in(E) for an input E of:

- 'conv': the post-quant features h, exactly VQGAN's conv_in(h);
- 'sinusoid': fixed 2-D sinusoidal positional features of the latent grid
  (`sinusoidal_grid`), as wide as z_q;
- 'constant': a learned map [h, w, d] (parameter `f0_constant`), d z_q's width:
  "learned parameters with the same size as the embedded discrete feature"
  (Sec. 4.4); it fixes the latent grid size at initialisation;
- 'fourier' (the default, the paper's best, Fig. 6a): [sin(p), cos(p)] for
  p = B z_q + b a learned 1x1 projection (`f0_fourier`) of z_q to
  `fourier_features` channels: "each Fourier feature is calculated from the
  corresponding discrete feature" (Sec. 4.4).

With f0 other than 'conv' the decoder does not read h (the tokenizer's
post_quant_conv then gets no gradient); z_q reaches it through F^0 ('fourier')
and the SpatialNorms. 'sinusoid' and 'constant' with no SpatialNorm would ignore
the codes altogether, which `check_config` rejects.

Parameter paths: the decoder creates every module of 'vqgan' under the same
name; a conditioned normalisation keeps its path (e.g. `mid_res0/norm1`) but
holds `phi_gamma` and `phi_beta` instead of GroupNorm's scale and bias, and
F^0 adds `f0_fourier` or `f0_constant` (and changes conv_in's input width for
f0 other than 'conv' where E is not as wide as h). With spatial_norm_blocks=0
and f0='conv' the parameters are exactly those of 'vqgan'.

z_q is the quantiser's `quantized` output [B, h, w, d] (`vqjax.nn.vqgan.VQGAN.decode`);
for the 'multichannel' quantiser (MoVQ Sec. 3.1) it is already the c chunks of
d/c concatenated back to [B, h, w, d] (`merge_channels`), so the decoder sees
one d-wide code map whatever the quantiser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.errors import ConfigError
from vqjax.nn.decoders import Decoder
from vqjax.nn.layers import (
  CHANNEL_AXES,
  CONV_KERNEL_AXES,
  AttnBlock,
  ResBlock,
  Upsample,
  conv,
  group_norm,
  named,
  remat_block,
  swish,
  upsample_nearest,
)
from vqjax.ops import conv as fast_conv

F0_CHOICES = ("fourier", "conv", "sinusoid", "constant")
ALL = "all"
GROUP_NORM_EPSILON = 1e-6  # Flax's default, also MoVQGAN's (eps=1e-6)


# --------------------------------------------------------------------------------------
# Blocks and the spatial_norm_blocks field.


def spatial_norm_blocks_field(value: int | str = 3) -> ml_collections.FieldReference:
  """The config value of `spatial_norm_blocks`: `value` (an int or 'all') in a
  FieldReference of type object, which ConfigDict and the command line let hold either."""
  return ml_collections.FieldReference(value, field_type=object)


def block_names(ch_mult: Sequence[int], num_res_blocks: int) -> list[str]:
  """The decoder's blocks in call order (see the module docstring): 3 + L (R + 1) + 1."""
  names = ["mid_res0", "mid_attn", "mid_res1"]
  for level in reversed(range(len(ch_mult))):
    names += [f"up{level}_res{i}" for i in range(num_res_blocks + 1)]
  return names + ["norm_out"]


def _blocks_message(value, total: int, ch_mult, num_res_blocks: int, where: str) -> str:
  return (f"{where}.spatial_norm_blocks={value!r} must be an int in [0, {total}] or 'all': "
          f"this decoder has {total} blocks (3 middle, {len(ch_mult)} levels x "
          f"{num_res_blocks + 1} up, norm_out; ch_mult={tuple(ch_mult)}, "
          f"num_res_blocks={num_res_blocks}).")


def conditioned_count(value, ch_mult: Sequence[int], num_res_blocks: int,
                      where: str = "model.decoder") -> int:
  """How many leading blocks `spatial_norm_blocks=value` conditions (ConfigError if invalid)."""
  total = len(block_names(ch_mult, num_res_blocks))
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if isinstance(value, str) and value == ALL:
    return total
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= total:
    return int(value)
  raise ConfigError(_blocks_message(value, total, ch_mult, num_res_blocks, where))


# --------------------------------------------------------------------------------------
# Spatially conditional normalisation (Eq. 4).


def _conv1x1(features: int, bias_init, dtype, name: str) -> nn.Conv:
  """A 1x1 `nn.Conv` with named axes, like `layers.conv` but with the given bias init."""
  return nn.Conv(features, (1, 1), dtype=dtype, name=name,
                 kernel_init=named(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
                 bias_init=named(bias_init, CHANNEL_AXES),
                 conv_general_dilated=fast_conv.conv_general_dilated)


def nearest_factor(z_size: Sequence[int], f_size: Sequence[int]) -> int:
  """The integer factor f with f_size = f * z_size on both axes (ValueError if none)."""
  (zh, zw), (fh, fw) = z_size, f_size
  if fh % zh or fw % zw or fh // zh != fw // zw:
    raise ValueError(f"z_q's {zh}x{zw} grid does not upsample by one integer factor to the "
                     f"{fh}x{fw} feature map")
  return fh // zh


class SpatialNorm(nn.Module):
  """(F [B, H, W, C], z_q [B, h, w, d]) -> phi_gamma(z_q) * GroupNorm(F) + phi_beta(z_q),
  MoVQ Eq. 4, with H = f h, W = f w for an integer f.

  GroupNorm here has no scale or bias: Eq. 4 normalises F to (F - mu) / sigma
  and the modulation takes the affine's place. (ai-forever/MoVQGAN keeps
  GroupNorm's affine as well; a per-channel a * n + b inside the modulation is
  absorbed by the 1x1 convs, phi_gamma(z) (a n + b) = (a phi_gamma(z)) n +
  b phi_gamma(z), both linear in z, so dropping it loses nothing.)

  phi_gamma and phi_beta are 1x1 convolutions with bias, applied at z_q's
  resolution and then upsampled: a 1x1 conv acts on each position alone, so it
  commutes with nearest-neighbour upsampling, and this costs f^2 times less
  than convolving the upsampled z_q. phi_gamma's bias starts at 1 (phi_beta's
  at 0), so at initialisation the layer is close to a plain GroupNorm whatever
  z_q's scale, instead of multiplying the features by a near-zero gamma.
  """

  num_groups: int = 32
  epsilon: float = GROUP_NORM_EPSILON
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f: jax.Array, z_q: jax.Array) -> jax.Array:
    factor = nearest_factor(z_q.shape[1:3], f.shape[1:3])
    c = f.shape[-1]
    gamma = _conv1x1(c, nn.initializers.ones, self.dtype, "phi_gamma")(z_q)
    beta = _conv1x1(c, nn.initializers.zeros, self.dtype, "phi_beta")(z_q)
    if factor > 1:
      gamma, beta = upsample_nearest(gamma, factor), upsample_nearest(beta, factor)
    normed = nn.GroupNorm(self.num_groups, epsilon=self.epsilon, use_scale=False,
                          use_bias=False, dtype=self.dtype, name="group_norm")(f)
    return gamma * normed + beta


# --------------------------------------------------------------------------------------
# The initial feature F^0.


def _sinusoid_1d(positions: np.ndarray, channels: int) -> np.ndarray:
  """[n] -> [n, channels]: sin then cos at frequencies 10000^(-k / (channels // 2)),
  k < channels // 2 (Vaswani et al.'s encoding); a zero column pads an odd width."""
  half = channels // 2
  freqs = 10000.0 ** (-np.arange(half) / max(half, 1))
  angles = positions[:, None] * freqs[None, :]
  out = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.pad(out, ((0, 0), (0, channels - 2 * half)))


def sinusoidal_grid(height: int, width: int, channels: int) -> np.ndarray:
  """[height, width, channels] fixed 2-D positional features: the row's 1-D sinusoids on
  the first channels // 2 channels, the column's on the rest."""
  rows = channels // 2
  row = _sinusoid_1d(np.arange(height, dtype=np.float64), rows)
  col = _sinusoid_1d(np.arange(width, dtype=np.float64), channels - rows)
  grid = np.concatenate([np.broadcast_to(row[:, None, :], (height, width, rows)),
                         np.broadcast_to(col[None, :, :], (height, width, channels - rows))],
                        axis=-1)
  return grid.astype(np.float32)


# --------------------------------------------------------------------------------------
# The decoder.


@registry.DECODERS.register("movq", not_config=("out_channels", "dtype", "remat"))
class MoVQDecoder(Decoder):
  """The VQGAN decoder with SpatialNorm in its first `spatial_norm_blocks` blocks and the
  initial feature `f0`; (h [B, h, w, C], z_q [B, h, w, d]) -> x_hat [B, h f, w f, out].

  `fourier_features` (default 128): the width of the learned projection of f0='fourier';
  sin and cos make E 2 x 128 = 256 wide, the paper's z_channels and code width
  n_z (Sec. 4.2: 4 channels of 64), so conv_in keeps VQGAN's shape and size at
  the paper's settings and F^0 has as many input features as the codes.
  """

  spatial_norm_blocks: int | str = dataclasses.field(default_factory=spatial_norm_blocks_field)
  f0: str = "fourier"
  fourier_features: int = 128

  def __post_init__(self):
    # A module built straight from the field's default holds the plain value.
    if isinstance(self.spatial_norm_blocks, ml_collections.FieldReference):
      object.__setattr__(self, "spatial_norm_blocks", self.spatial_norm_blocks.get())
    super().__post_init__()

  @staticmethod
  def check_config(cfg) -> None:
    """Decoder's checks; f0 one of F0_CHOICES; fourier_features >= 1; spatial_norm_blocks
    an int in [0, number of blocks] or 'all'; some SpatialNorm unless f0 reads the codes."""
    Decoder.check_config(cfg)
    check_fields(cfg, "model.decoder", {"f0": F0_CHOICES, "fourier_features": ">=1"})
    count = conditioned_count(cfg.spatial_norm_blocks, cfg.ch_mult, cfg.num_res_blocks)
    if count == 0 and cfg.f0 in ("sinusoid", "constant"):
      raise ConfigError(
          f"model.decoder.f0={cfg.f0!r} with spatial_norm_blocks=0 gives a decoder that never "
          "reads the codes: set spatial_norm_blocks >= 1 (or 'all'), or f0='conv' or "
          "'fourier'.")

  def initial_input(self, h: jax.Array, z_q: jax.Array) -> jax.Array:
    """E, the input of conv_in, for `f0` (see the module docstring)."""
    b, height, width, d = z_q.shape
    if self.f0 == "conv":
      return h
    if self.f0 == "sinusoid":
      grid = jnp.asarray(sinusoidal_grid(height, width, d), z_q.dtype)
      return jnp.broadcast_to(grid[None], (b, height, width, d))
    if self.f0 == "constant":
      const = self.param("f0_constant", named(nn.initializers.normal(1.0),
                                              (None, None, "conv_in")), (height, width, d))
      return jnp.broadcast_to(const.astype(z_q.dtype)[None], (b, height, width, d))
    if self.f0 == "fourier":
      p = conv(self.fourier_features, (1, 1), dtype=self.dtype, name="f0_fourier")(z_q)
      return jnp.concatenate([jnp.sin(p), jnp.cos(p)], axis=-1)
    raise ConfigError(f"model.decoder.f0={self.f0!r} must be one of {F0_CHOICES}.")

  def _norm(self, spatial: bool):
    """The normalisation of a block: SpatialNorm (called with z_q) or VQGAN's GroupNorm."""
    return functools.partial(SpatialNorm, dtype=self.dtype) if spatial else group_norm

  def _res(self, features: int, name: str, h, z_q, spatial: bool) -> jax.Array:
    block = remat_block(ResBlock, self.remat)(features, self.norm_groups, self.dtype,
                                              norm=self._norm(spatial), name=name)
    return block(h, z_q) if spatial else block(h)

  def _attn(self, name: str, h, z_q, spatial: bool) -> jax.Array:
    block = remat_block(AttnBlock, self.remat)(self.norm_groups, self.dtype,
                                               norm=self._norm(spatial), name=name)
    return block(h, z_q) if spatial else block(h)

  @nn.compact
  def __call__(self, z: jax.Array, z_q: jax.Array | None = None) -> jax.Array:
    if z_q is None:
      raise ValueError("the 'movq' decoder conditions on z_q: call it as decoder(h, z_q)")
    names = block_names(self.ch_mult, self.num_res_blocks)
    spatial = set(names[:conditioned_count(self.spatial_norm_blocks, self.ch_mult,
                                           self.num_res_blocks)])
    width = self.ch * self.ch_mult[-1]
    h = conv(width, (3, 3), dtype=self.dtype, name="conv_in")(self.initial_input(z, z_q))
    for name in ("mid_res0", "mid_attn", "mid_res1"):
      if name == "mid_attn":
        h = self._attn(name, h, z_q, name in spatial)
      else:
        h = self._res(width, name, h, z_q, name in spatial)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        block = f"up{level}_res{i}"
        h = self._res(self.ch * self.ch_mult[level], block, h, z_q, block in spatial)
        if h.shape[1] in self.attn_resolutions:
          h = self._attn(f"up{level}_attn{i}", h, z_q, block in spatial)
      h = self.level_blocks(h, level)
      if level != 0:
        h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_sample")(h)
    if "norm_out" in spatial:
      h = SpatialNorm(self.norm_groups, dtype=self.dtype, name="norm_out")(h, z_q)
    else:
      h = group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h)
    h = swish(h)
    self.sow("intermediates", "last_features", h)
    return conv(self.out_channels, (3, 3), dtype=self.dtype, name=self.LAST_LAYER)(h)
