"""MaskGIT masking and iterative decoding (SPEC section 6; Chang et al. 2022), pure functions.

Token maps are [B, N] or multichannel [B, N, c]; every (position, channel)
entry is masked, sampled and ranked on its own. `logits_fn(tokens)` returns
[..., K] logits for the same shape (wrap the model, the condition and any
classifier-free guidance in it; see `guided_logits`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cosine_schedule(r):
  """Fraction of tokens masked at progress r in [0, 1]: cos(pi/2 r)."""
  return jnp.cos(0.5 * jnp.pi * r)


def num_masked_after_step(step, total_steps: int, num_tokens: int):
  """Tokens still masked after decoding step `step` (0-based) of `total_steps`.

  floor(N cos(pi/2 (step+1)/T)), at least 1 before the last step, 0 after it.
  The table is built in float64 on the host (in float32, N cos(pi/3) = N/2
  can floor to N/2 - 1) and indexed by the traced step.
  """
  t = np.arange(1, total_steps + 1, dtype=np.float64) / total_steps
  table = np.maximum(np.floor(num_tokens * np.cos(0.5 * np.pi * t) + 1e-9), 1).astype(np.int32)
  table[-1] = 0
  return jnp.asarray(table)[step]


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
  re-masks the floor(N cos(pi/2 (t+1)/T)) least confident of the newly
  sampled ones, confidence = log p(sample) + choice_temperature (1 - (t+1)/T)
  Gumbel noise. Entries fixed earlier (or given) are never re-masked.
  Returns (final tokens, [T, ...] token maps after each step).
  """
  num_tokens = int(np.prod(tokens.shape[1:]))

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
    num = jnp.minimum(num_masked_after_step(t, num_steps, num_tokens), jnp.maximum(still - 1, 0))
    num = jnp.where(t + 1 >= num_steps, 0, num)
    remask = mask_lowest(confidence, num) & masked
    new = jnp.where(remask, mask_id, sampled)
    return (new, rng), new

  (final, _), history = jax.lax.scan(step, (tokens, rng), jnp.arange(num_steps))
  return final, history
