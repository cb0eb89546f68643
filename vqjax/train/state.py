"""Explicit training state for the tokenizer (generator + discriminator)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array  # int32 scalar: number of updates taken
  params: Any  # tokenizer params (encoder, quantiser, decoder, 1x1 convs)
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  vq_stats: Any  # mutable quantiser statistics ({} when the codebook is learned by loss)
  disc_stats: Any  # mutable discriminator statistics ({} for the PatchGAN)
  loss_stats: Any  # LeCam anchors {'real', 'fake'} ({} when LeCam is off)
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)
