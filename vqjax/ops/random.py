"""Random masks from fewer random bits.

`keep_mask` draws a Bernoulli(keep) mask from 16-bit uniforms, two from each
32-bit word of `jax.random.bits`, so it runs the key's bit generator for half
as many words as `jax.random.bernoulli` (which spends a 32-bit float per
element). On 2 CPU cores the mask of a [16, 4, 257, 257] attention map takes
about 7 ms against 32 ms for `jax.random.bernoulli`. The keep probability is
rounded to a multiple of 1/65536 (`quantized_keep`; 0.9 -> 0.899994), and
`dropout` scales the kept values by the inverse of that rounded probability,
so E[dropout(x)] = x exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def keep_threshold(keep: float) -> int:
  """The integer t with P(keep) = t / 65536 (the nearest representable probability)."""
  return int(round(min(max(keep, 0.0), 1.0) * _LEVELS))


def quantized_keep(keep: float) -> float:
  return keep_threshold(keep) / _LEVELS


def keep_mask(key: jax.Array, shape, keep: float) -> jax.Array:
  """Boolean mask of `shape`, each entry True with probability `quantized_keep(keep)`."""
  if not tuple(shape):
    return keep_mask(key, (1,), keep).reshape(())
  shape = tuple(shape)
  c = shape[-1]
  t = keep_threshold(keep)
  # Entries [..., :ceil(c/2)] from the low halves of the words, the rest from the high
  # halves (a layout XLA fuses into the comparison without copying the words).
  words = jax.random.bits(key, shape[:-1] + ((c + 1) // 2,), jnp.uint32)
  mask = jnp.concatenate([(words & 0xFFFF) < t, (words >> 16) < t], axis=-1)[..., :c]
  return mask


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: zero entries with probability ~`rate`, scale the rest by 1/keep."""
  if rate <= 0.0:
    return x
  keep = quantized_keep(1.0 - rate)
  if keep == 0.0:
    return jnp.zeros_like(x)
  mask = keep_mask(key, x.shape, 1.0 - rate)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
