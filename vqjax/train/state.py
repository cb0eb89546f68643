"""Explicit training state for the tokenizer (generator + discriminator)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array  # int32 scalar: number of updates taken
  params: Any  # VQGAN params
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  vq_stats: Any  # mutable quantiser statistics ({} when the codebook is learned by loss)
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)
