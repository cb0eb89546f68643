"""SeQ-GAN's enhanced decoder (Sec. 3.3.1, Table 1), registered as decoder 'seqgan'.

The VQGAN decoder ('vqgan', `vqjax.nn.decoders.Decoder`) with two extra blocks
at each resolution level of the up path, after that level's ResBlocks and
AttnBlocks and before its Upsample:

- `enhance="attention"` (default, the paper's "+Attention x2" and its phase-2
  decoder): a regional attention block `up{level}_regional` (self-attention
  inside non-overlapping `window_size` x `window_size` windows) then a dilated
  attention block `up{level}_dilated` (MaxViT's grid attention: the map cut
  into a `grid_size` x `grid_size` grid, each group the grid_size^2 positions
  strided by H/grid_size, W/grid_size, i.e. equal (h mod H/g, w mod W/g)).
  Each block is pre-norm with residuals, x + Attn(LN(x)) then
  x + MLP(LN(x)) with hidden width `mlp_ratio` * C (no MLP when 0), with
  max(1, C // head_dim) heads. There is no relative position bias: the
  convolutions around the blocks carry the positions.
- `enhance="conv"` (the paper's "+Conv x2"): two ResBlocks `up{level}_conv0`,
  `up{level}_conv1`.
- `enhance="none"`: exactly the VQGAN decoder.

Every parameter path of 'vqgan' with the same config is a path of 'seqgan'
with the same shape (the class subclasses `Decoder` and only fills its
`level_blocks` hook), so phase 2 of SeQ-GAN can copy the phase-1 decoder in
by path; only the blocks above start fresh. The decoder contract
(LAST_LAYER, `last_layer()`, `intermediates/last_features`) is Decoder's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.errors import ConfigError
from vqjax.nn.decoders import Decoder
from vqjax.nn.layers import CHANNEL_AXES, ResBlock, dense, named, remat_block

ENHANCE_CHOICES = ("attention", "conv", "none")


# --------------------------------------------------------------------------------------
# Attention maths: pure functions.


def window_partition(x: jax.Array, w: int) -> jax.Array:
  """[B, H, W, C] -> [B * (H/w) * (W/w), w * w, C]: the non-overlapping w x w windows,
  batch-major then window row-major; inside a window, positions in row-major order."""
  b, h, wd, c = x.shape
  x = x.reshape(b, h // w, w, wd // w, w, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b * (h // w) * (wd // w), w * w, c)


def window_unpartition(x: jax.Array, w: int, height: int, width: int) -> jax.Array:
  """The inverse of `window_partition`: [B * nw, w * w, C] -> [B, height, width, C]."""
  c = x.shape[-1]
  x = x.reshape(-1, height // w, width // w, w, w, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def grid_partition(x: jax.Array, g: int) -> jax.Array:
  """[B, H, W, C] -> [B * (H/g) * (W/g), g * g, C]: MaxViT's grid groups.

  Group (a, b) (a < H/g, b < W/g) holds the g * g positions (i H/g + a, j W/g + b),
  i, j < g, in row-major (i, j) order: the positions with h mod H/g = a and
  w mod W/g = b, a dilated g x g window covering the whole map.
  """
  b, h, wd, c = x.shape
  x = x.reshape(b, g, h // g, g, wd // g, c)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b * (h // g) * (wd // g), g * g, c)


def grid_unpartition(x: jax.Array, g: int, height: int, width: int) -> jax.Array:
  """The inverse of `grid_partition`: [B * ng, g * g, C] -> [B, height, width, C]."""
  c = x.shape[-1]
  x = x.reshape(-1, height // g, width // g, g, g, c)
  return x.transpose(0, 3, 1, 4, 2, 5).reshape(-1, height, width, c)


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                        mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention over the last-but-one axis: q [..., Nq, C], k, v [..., Nk, C]
  -> [..., Nq, C], the channels split into `heads` heads of C / heads.

  Logits scaled by 1/sqrt(C / heads); softmax in float32. `mask` (boolean,
  broadcastable to [..., Nq, Nk]) keeps the keys where it is True.
  """
  c = q.shape[-1]
  if c % heads:
    raise ValueError(f"{heads} heads do not divide {c} channels")
  d = c // heads
  split = lambda t: t.reshape(t.shape[:-1] + (heads, d))
  logits = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)).astype(jnp.float32)
  logits = logits / np.sqrt(d)
  if mask is not None:
    logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  y = jnp.einsum("...hqk,...khd->...qhd", weights, split(v))
  return y.reshape(y.shape[:-2] + (c,))


def num_heads(width: int, head_dim: int) -> int:
  """max(1, width // head_dim): the heads of an attention block of `width` channels."""
  return max(1, width // head_dim)


PARTITIONS = {"window": (window_partition, window_unpartition),
              "grid": (grid_partition, grid_unpartition)}


# --------------------------------------------------------------------------------------
# Modules.


def layer_norm(name: str, dtype: jnp.dtype = jnp.float32) -> nn.LayerNorm:
  """`nn.LayerNorm` over channels whose scale and bias carry the channel axis name; output
  in `dtype` (its mean and variance are float32 whatever `dtype`)."""
  return nn.LayerNorm(name=name, dtype=dtype,
                      scale_init=named(nn.initializers.ones, CHANNEL_AXES),
                      bias_init=named(nn.initializers.zeros, CHANNEL_AXES))


class PartitionedAttentionBlock(nn.Module):
  """x [B, H, W, C] -> x + Attn(LN(x)), then + MLP(LN(.)): self-attention inside the
  groups of `partition` ('window': `size` x `size` windows; 'grid': a `size` x `size`
  grid, MaxViT's grid attention), with max(1, C // head_dim) heads.

  Parameters: norm1, q, k, v, proj (C -> C), and unless mlp_ratio is 0, norm2,
  fc1 (C -> mlp_ratio C), fc2 (-> C) with a GELU between.
  """

  partition: str
  size: int
  head_dim: int = 64
  mlp_ratio: float = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, c = x.shape
    if height % self.size or width % self.size:
      raise ConfigError(f"{self.partition} attention of size {self.size} does not divide the "
                        f"{height}x{width} feature map: choose a divisor of both.")
    split, merge = PARTITIONS[self.partition]
    y = split(layer_norm("norm1", self.dtype)(x), self.size)
    q, k, v = (dense(c, dtype=self.dtype, name=n)(y) for n in ("q", "k", "v"))
    y = multihead_attention(q, k, v, num_heads(c, self.head_dim))
    y = dense(c, dtype=self.dtype, name="proj")(y)
    x = x + merge(y, self.size, height, width)
    hidden = int(round(self.mlp_ratio * c))
    if hidden:
      y = dense(hidden, dtype=self.dtype, name="fc1")(layer_norm("norm2", self.dtype)(x))
      x = x + dense(c, dtype=self.dtype, name="fc2")(nn.gelu(y))
    return x


@registry.DECODERS.register("seqgan", not_config=("out_channels", "dtype", "remat"))
class SeQGANDecoder(Decoder):
  """The VQGAN decoder plus two blocks per level (`enhance`: 'attention', 'conv' or 'none');
  (h [B, h, w, C], z_q) -> x_hat [B, h f, w f, out_channels], z_q unused."""

  enhance: str = "attention"
  window_size: int = 8
  grid_size: int = 8
  head_dim: int = 64
  mlp_ratio: float = 2

  @staticmethod
  def check_config(cfg) -> None:
    """Decoder's checks, the field ranges, and head_dim giving whole heads at every width."""
    Decoder.check_config(cfg)
    check_fields(cfg, "model.decoder", {
        "enhance": ENHANCE_CHOICES, "window_size": ">=1", "grid_size": ">=1",
        "head_dim": ">=1", "mlp_ratio": ">=0"})
    if cfg.enhance != "attention":
      return
    widths = sorted({cfg.ch * mult for mult in cfg.ch_mult})
    for width in widths:
      heads = num_heads(width, cfg.head_dim)
      if width % heads:
        raise ConfigError(
            f"model.decoder.head_dim={cfg.head_dim} gives {heads} heads for channel width "
            f"{width} (ch={cfg.ch}, ch_mult={tuple(cfg.ch_mult)}), which they do not divide: "
            f"choose a head_dim that divides every width {widths} (or exceeds it).")

  @staticmethod
  def check_geometry(cfg, latent_size: int) -> None:
    """ConfigError unless window_size and grid_size divide the feature map at every level
    (latent_size * 2^k, k < len(ch_mult)); nothing to check unless enhance='attention'."""
    if cfg.enhance != "attention":
      return
    sizes = [latent_size * 2 ** k for k in range(len(cfg.ch_mult))]
    valid = [d for d in range(1, latent_size + 1) if latent_size % d == 0]
    for field in ("window_size", "grid_size"):
      value = cfg[field]
      for size in sizes:
        if size % value:
          raise ConfigError(
              f"model.decoder.{field}={value} does not divide the {size}x{size} feature map "
              f"of a decoder level (maps {', '.join(map(str, sizes))} for latent size "
              f"{latent_size}): choose one of {valid}.")

  def level_blocks(self, h: jax.Array, level: int) -> jax.Array:
    """The two blocks of up level `level` (see the module docstring)."""
    if self.enhance == "attention":
      block = remat_block(PartitionedAttentionBlock, self.remat)
      h = block("window", self.window_size, self.head_dim, self.mlp_ratio, self.dtype,
                name=f"up{level}_regional")(h)
      return block("grid", self.grid_size, self.head_dim, self.mlp_ratio, self.dtype,
                   name=f"up{level}_dilated")(h)
    if self.enhance == "conv":
      res = remat_block(ResBlock, self.remat)
      for i in range(2):
        h = res(h.shape[-1], self.norm_groups, self.dtype, name=f"up{level}_conv{i}")(h)
      return h
    if self.enhance == "none":
      return h
    raise ConfigError(f"model.decoder.enhance={self.enhance!r} must be one of "
                      f"{ENHANCE_CHOICES}.")
