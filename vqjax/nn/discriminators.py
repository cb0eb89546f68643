"""PatchGAN discriminator (pix2pix / VQGAN NLayerDiscriminator, SPEC section 1) and the
FQ-GAN feature-quantisation layers every discriminator can take (SPEC section 5).

The discriminator contract (every registered discriminator keeps it):
`__call__(x, train, labels=None)` -> (logits, extra_losses) with `extra_losses`
a dict of scalars the trainer adds to the discriminator's loss (e.g. a
quantisation loss inside the discriminator); statistics a discriminator
keeps live in the mutable collection `disc_stats` and change only when the
caller makes it mutable and passes `train=True`. `labels` [B] int32 are the
classes of a class-conditional discriminator; an unconditional one ignores
them. The logits are a patch map [B, H', W', 1] (PatchGAN) or one per image
[B] (`vqjax.nn.biggan`), float32 whatever the compute dtype `dtype` (a field
the trainer sets from `config.precision`); the GAN losses average over all of
them.

FQ-GAN (Zhao et al., 2020, Sec. 3, Eq. 5-9): the config fields `fq_layers`
(indices of the blocks after which features are quantised; () = off),
`fq_log2_size` (P: dictionary size K = 2^P), `fq_alpha` (weight of L_Q in
D's loss, Eq. 9), `fq_beta` (commitment, Eq. 7), `fq_decay` (lambda of the
momentum update, Eq. 8) and `fq_propagate` (True: the quantised features go
on, Eq. 6; False: only the loss is added, as the released code does). Each
FQ layer is a `FeatureQuantizer` named `fq_<i>` whose dictionary (of the
block's channels) lives in `disc_stats`; its loss enters `extra_losses` as
'fq/<i>' = fq_alpha * beta ||h - sg(e_k)||^2.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.checks import check_fields
from vqjax.errors import ConfigError
from vqjax.nn.layers import CHANNEL_AXES, conv, named
from vqjax.nn.quantizers import FeatureQuantizer
from vqjax.ops import quantize as vq

FQ_RULES = {"fq_log2_size": "[1,16]", "fq_alpha": ">=0", "fq_beta": ">=0", "fq_decay": "[0,1)",
            "fq_propagate": (True, False)}
_FQ_NAME = re.compile(r"fq_(\d+)")


def check_fq_config(cfg, where: str, num_blocks: int) -> None:
  """ConfigError for an FQ field out of range or an `fq_layers` entry naming a block the
  discriminator (of `num_blocks` blocks) does not have."""
  check_fields(cfg, where, FQ_RULES)
  size = cfg.get("fq_log2_size", 1)
  if isinstance(size, bool) or not isinstance(size, int):
    raise ConfigError(f"{where}.fq_log2_size={size!r} must be an integer P in [1, 16] "
                      "(dictionary size 2^P).")
  layers, valid = tuple(cfg.get("fq_layers", ())), tuple(range(num_blocks))
  for index in layers:
    if isinstance(index, bool) or index not in valid:
      raise ConfigError(f"{where}.fq_layers={layers!r} names block {index!r}, which this "
                        f"discriminator does not have: use block indices from {valid} "
                        "(() turns FQ off).")


def fq_after_block(disc: nn.Module, index: int, h: jax.Array,
                   train: bool) -> tuple[jax.Array, dict]:
  """FQ-GAN Eq. 5-8 after block `index` of `disc` (a module with the fq_* fields), inside
  its compact call: (features passed on, {'fq/<index>': fq_alpha * L_Q}); (h, {}) where the
  block has no FQ layer. The dictionary is updated only when `train` and `disc_stats` is
  mutable."""
  if index not in disc.fq_layers:
    return h, {}
  out = FeatureQuantizer(codebook_size=2**disc.fq_log2_size, embed_dim=h.shape[-1],
                         beta=disc.fq_beta, decay=disc.fq_decay, propagate=disc.fq_propagate,
                         collection="disc_stats", name=f"fq_{index}")(h, train=train)
  return out.quantized.astype(h.dtype), {f"fq/{index}": disc.fq_alpha * out.losses["commitment"]}


def fq_dictionary_usage(disc_stats, threshold: float = 1e-3) -> dict[int, dict[str, jax.Array]]:
  """Per FQ layer of a discriminator's `disc_stats` (boxed or not; {} without FQ):
  {block index: {'usage': fraction of codes whose EMA cluster size N_k (Eq. 8) exceeds
  `threshold`, 'perplexity': exp H(N / sum N)}}. Pure, so it runs inside a jitted step."""
  stats = nn.unbox(disc_stats) if disc_stats else {}
  out = {}
  for name in sorted(stats, key=lambda n: (len(n), n)):
    match = _FQ_NAME.fullmatch(name)
    if match is None or "cluster_size" not in stats[name]:
      continue
    sizes = jnp.asarray(stats[name]["cluster_size"], jnp.float32)
    out[int(match.group(1))] = {"usage": jnp.mean((sizes > threshold).astype(jnp.float32)),
                                "perplexity": vq.perplexity(sizes)}
  return out


class BatchStatNorm(nn.Module):
  """Batch normalisation with the statistics of the current batch, scale and bias.

  The discriminator is only ever run in training, where batch norm uses the
  batch's own mean and variance; it keeps no running averages because nothing
  would read them. Under a sharded jit the batch is global, so the moments
  are taken over the whole global batch. The moments and the normalisation
  are computed in float32; the output has x's dtype.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.var(x32, axis=(0, 1, 2))
    scale = self.param("scale", named(nn.initializers.ones, CHANNEL_AXES), (c,))
    bias = self.param("bias", named(nn.initializers.zeros, CHANNEL_AXES), (c,))
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


@registry.DISCRIMINATORS.register("patchgan", not_config=("dtype",))
class PatchDiscriminator(nn.Module):
  """x [B, H, W, 3] -> (patch logits [B, H', W', 1], FQ losses).

  Block 0: conv4x4/2 -> LReLU; blocks 1..num_layers - 1: conv4x4/2 -> BN ->
  LReLU; block num_layers: conv4x4/1 -> BN -> LReLU; then a conv4x4/1 to one
  channel. FQ layers (module docstring) may follow any block 0..num_layers;
  they add no parameters, so the parameter tree is the same with or without.
  Unconditional: `labels` is ignored. The convs compute in `dtype` (set by the
  trainer), the logits come out float32.
  """

  ndf: int = 64
  num_layers: int = 3
  fq_layers: tuple[int, ...] = ()
  fq_log2_size: int = 10
  fq_alpha: float = 1.0
  fq_beta: float = 0.25
  fq_decay: float = 0.9
  fq_propagate: bool = True
  dtype: jnp.dtype = jnp.float32

  @staticmethod
  def check_config(cfg, where: str = "disc") -> None:
    """ndf >= 1, num_layers >= 1, and the FQ fields (blocks 0..num_layers)."""
    check_fields(cfg, where, {"ndf": ">=1", "num_layers": ">=1"})
    check_fq_config(cfg, where, cfg.get("num_layers", PatchDiscriminator.num_layers) + 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True,
               labels: jax.Array | None = None) -> tuple[jax.Array, dict]:
    del labels  # unconditional
    init = nn.initializers.normal(0.02)
    h = conv(self.ndf, (4, 4), strides=(2, 2), padding=1, kernel_init=init, dtype=self.dtype)(x)
    h, extra = fq_after_block(self, 0, nn.leaky_relu(h, 0.2), train)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(self.ndf * min(2**n, 8), (4, 4), strides=(stride, stride), padding=1,
               use_bias=False, kernel_init=init, dtype=self.dtype)(h)
      h, losses = fq_after_block(self, n, nn.leaky_relu(BatchStatNorm()(h), 0.2), train)
      extra.update(losses)
    logits = conv(1, (4, 4), strides=(1, 1), padding=1, kernel_init=init, dtype=self.dtype)(h)
    return logits.astype(jnp.float32), extra
