"""MaskGIT masking and iterative decoding (SPEC section 6; Chang et al. 2022), pure functions.

Token maps are [B, N] or multichannel [B, N, c]; every (position, channel)
entry is masked, sampled and ranked on its own. `logits_fn(tokens)` returns
[..., K] logits for the same shape (wrap the model, the condition and any
classifier-free guidance in it; see `guided_logits`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cosine_schedule(r):
  """Fraction of tokens masked at progress r in [0, 1]: cos(pi/2 r)."""
  return jnp.cos(0.5 * jnp.pi * r)


@functools.lru_cache(maxsize=64)
def _schedule_table(total_steps: int, max_tokens: int) -> np.ndarray:
  """[T, max_tokens + 1] int32: entry [t, n] = masked count after step t for n masked at first."""
  t = np.arange(1, total_steps + 1, dtype=np.float64) / total_steps
  n = np.arange(max_tokens + 1, dtype=np.float64)
  ratio = np.cos(0.5 * np.pi * t)[:, None]
  table = np.maximum(np.floor(n[None] * ratio + 1e-9), 1).astype(np.int32)
  table[-1] = 0
  table.flags.writeable = False
  return table


def num_masked_after_step(step, total_steps: int, num_tokens, max_tokens: int | None = None):
  """Entries still masked after decoding step `step` (0-based) of `total_steps`.

  floor(n cos(pi/2 (step+1)/T)), at least 1 before the last step, 0 after it,
  where n = `num_tokens` is the number of entries masked before the first step
  (an int, or an int array such as one count per example [B], which may be
  traced). As in MaskGIT's reference decoder (google-research/maskgit,
  `libml/parallel_decode.py`), given entries do not count: only the initially
  unknown ones are spread over the T steps.

  The values are looked up in a [T, max_tokens + 1] table built in float64 on
  the host (in float32, n cos(pi/3) = n/2 can floor to n/2 - 1), indexed by the
  traced step and counts. `max_tokens` bounds `num_tokens` (e.g. the number of
  entries of a token map); it defaults to the largest count, which must then
  be concrete.
  """
  if max_tokens is None:
    if isinstance(num_tokens, jax.core.Tracer):
      raise ValueError("num_masked_after_step: pass max_tokens when num_tokens is traced")
    max_tokens = int(np.max(num_tokens))
  table = jnp.asarray(_schedule_table(int(total_steps), int(max_tokens)))
  return table[step, jnp.asarray(num_tokens)]


def _flat(x):
  return x.reshape(x.shape[0], -1)


def mask_lowest(scores, num):
  """Boolean mask of the `num` (per row, [B]) lowest scores of [B, ...] (ties by position)."""
  flat = _flat(scores)
  ranks = jnp.argsort(jnp.argsort(flat, axis=-1), axis=-1)
  return (ranks < num[:, None]).reshape(scores.shape)


def training_mask(rng, shape):
  """MaskGIT training mask over `shape` = [B, N] or [B, N, c].

  Per example u ~ U(0, 1), ratio cos(pi/2 u), ceil(ratio * N*c) entries
  (at least 1) chosen uniformly at random among all (position, channel) pairs.
  """
  rng_u, rng_s = jax.random.split(rng)
  total = int(np.prod(shape[1:]))
  ratio = cosine_schedule(jax.random.uniform(rng_u, (shape[0],)))
  num = jnp.clip(jnp.ceil(ratio * total).astype(jnp.int32), 1, total)
  return mask_lowest(jax.random.uniform(rng_s, shape), num)


def guided_logits(cond_logits, uncond_logits, scale: float):
  """Classifier-free guidance: l_c + scale (l_c - l_u); scale 0 is the conditional model."""
  return cond_logits + scale * (cond_logits - uncond_logits)


def decode(logits_fn: Callable, tokens, mask_id: int, rng, num_steps: int = 12,
           choice_temperature: float = 4.5, temperature: float = 1.0):
  """Iterative parallel decoding from `tokens` (masked entries = `mask_id`).

  Step t samples every masked entry from softmax(logits / temperature), then
  re-masks the floor(n cos(pi/2 (t+1)/T)) least confident of the newly sampled
  ones (at least 1, and at most all but one of them, before the last step),
  confidence = log p(sample) + choice_temperature (1 - (t+1)/T) Gumbel noise.
  n counts, per example, the entries masked in `tokens` ((position, channel)
  pairs for [B, N, c] maps): given entries (inpainting, editing) are not part
  of the schedule, as in MaskGIT's reference decoder (Chang et al. 2022).
  Entries fixed earlier (or given) are never re-masked or changed. When a
  single masked entry is left before the last step it is revealed, where the
  reference keeps it masked until the end; with every other entry fixed, it is
  sampled from the same logits either way.
  Returns (final tokens, [T, ...] token maps after each step).
  """
  num_entries = int(np.prod(tokens.shape[1:]))
  initially_masked = jnp.sum(_flat(tokens == mask_id), axis=-1)  # [B]

  def step(carry, t):
    tokens, rng = carry
    rng, rng_sample, rng_gumbel = jax.random.split(rng, 3)
    masked = tokens == mask_id
    logits = logits_fn(tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    sampled = jax.random.categorical(rng_sample, logp, axis=-1)
    sampled = jnp.where(masked, sampled, tokens)
    chosen_logp = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
    anneal = choice_temperature * (1.0 - (t + 1) / num_steps)
    confidence = chosen_logp + anneal * jax.random.gumbel(rng_gumbel, chosen_logp.shape)
    confidence = jnp.where(masked, confidence, jnp.inf)  # fixed entries are never re-masked
    still = jnp.sum(_flat(masked), axis=-1)
    scheduled = num_masked_after_step(t, num_steps, initially_masked, num_entries)
    num = jnp.minimum(scheduled, jnp.maximum(still - 1, 0))
    num = jnp.where(t + 1 >= num_steps, 0, num)
    remask = mask_lowest(confidence, num) & masked
    new = jnp.where(remask, mask_id, sampled)
    return (new, rng), new

  (final, _), history = jax.lax.scan(step, (tokens, rng), jnp.arange(num_steps))
  return final, history
