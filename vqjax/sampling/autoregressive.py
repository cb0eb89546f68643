"""Autoregressive sampling with temperature, top-k, top-p, guidance and a KV cache.

`decode_fn(ids, cache, index) -> (logits [B, T, K], cache)` runs ids at
positions index..index+T-1 (e.g. `GPT.decode` bound to its params). The
prefix is run once (prefill); then each `lax.scan` step feeds one token, so
no position is recomputed. The cache's leaves are [B, length, ...]; the
sampler hands `decode_fn` a cache only as long as the positions it can
attend to: the steps run in `cache_blocks` scans, each over a cache that ends
at the last position that block writes (grown by zero padding between
blocks). With 4 blocks a token attends on average to 5/8 of the full length
instead of all of it (masked), with the same results.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_NEG = -1e9
CACHE_BLOCKS = 4  # scans `sample` splits its steps into (see the module docstring)


def top_k_filter(logits, k: int):
  """Keep the k largest logits per row (ties at the k-th value kept); k <= 0 keeps all."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, _NEG, logits)


def top_p_filter(logits, p: float):
  """Keep the smallest set of top logits whose probability reaches p (nucleus); p >= 1 keeps all."""
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
  keep_sorted = before < p  # the first entry is always kept
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, logits, _NEG)


def sample_logits(rng, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """One sample per row from softmax(filtered logits / temperature)."""
  logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
  logits = top_p_filter(top_k_filter(logits, top_k), top_p)
  return jax.random.categorical(rng, logits, axis=-1)


def sample(decode_fn: Callable, cache, prefix_ids, num_tokens: int, rng,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           uncond_prefix_ids=None, guidance_scale: float = 0.0,
           cache_blocks: int = CACHE_BLOCKS):
  """Sample `num_tokens` codes after `prefix_ids` [B, P] using the KV cache.

  With `uncond_prefix_ids` (and a cache built for batch 2B), logits are
  guided: l_c + scale (l_c - l_u). Returns [B, num_tokens] int32.
  """
  b, p = prefix_ids.shape
  guided = uncond_prefix_ids is not None
  ids = jnp.concatenate([prefix_ids, uncond_prefix_ids]) if guided else prefix_ids

  def combine(logits):
    if not guided:
      return logits
    cond, uncond = logits[:b], logits[b:]
    return cond + guidance_scale * (cond - uncond)

  logits, cache = decode_fn(ids, resize_cache(cache, p), 0)
  rng, first = jax.random.split(rng)
  token = sample_logits(first, combine(logits[:, -1]), temperature, top_k, top_p)

  def step(carry, i):
    token, cache, rng = carry
    rng, key = jax.random.split(rng)
    feed = jnp.concatenate([token, token]) if guided else token
    logits, cache = decode_fn(feed[:, None], cache, p + i)
    nxt = sample_logits(key, combine(logits[:, 0]), temperature, top_k, top_p)
    return (nxt, cache, rng), token

  carry, tokens = (token, cache, rng), [jnp.zeros((0, b), jnp.int32)]
  for start, stop in block_bounds(num_tokens - 1, cache_blocks):
    carry = (carry[0], resize_cache(carry[1], p + stop), carry[2])  # step i writes p + i
    carry, block = jax.lax.scan(step, carry, jnp.arange(start, stop))
    tokens.append(block.astype(jnp.int32))
  last = carry[0]
  return jnp.concatenate([jnp.concatenate(tokens).T, last[:, None].astype(jnp.int32)],
                         axis=1).astype(jnp.int32)


def block_bounds(steps: int, blocks: int) -> list[tuple[int, int]]:
  """`steps` scan steps split into at most `blocks` contiguous (start, stop) ranges."""
  blocks = max(1, min(blocks, steps))
  edges = [round(steps * j / blocks) for j in range(blocks + 1)]
  return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def resize_cache(cache, length: int):
  """Every leaf [B, L, ...] cut or zero-padded to [B, length, ...] (positions beyond the
  filled ones are masked, so their values never matter)."""
  def resize(c):
    if c.shape[1] >= length:
      return c[:, :length]
    return jnp.pad(c, [(0, 0), (0, length - c.shape[1])] + [(0, 0)] * (c.ndim - 2))
  return jax.tree.map(resize, cache)


def attended_lengths(prefix_len: int, num_tokens: int,
                     cache_blocks: int = CACHE_BLOCKS) -> list[int]:
  """The cache length each fed position's attention spans in `sample` (prefill, then the
  steps): what its attention costs."""
  lengths = [prefix_len] * prefix_len
  for start, stop in block_bounds(num_tokens - 1, cache_blocks):
    lengths += [prefix_len + stop] * (stop - start)
  return lengths


def sample_without_cache(logits_fn: Callable, prefix_ids, num_tokens: int, rng,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Reference decoder that recomputes the whole (padded) sequence every step.

  `logits_fn(ids [B, P + num_tokens]) -> [B, P + num_tokens, K]` must be
  causal. Same results as `sample` for the same rng; used to measure what
  the cache saves.
  """
  b, p = prefix_ids.shape
  ids = jnp.concatenate([prefix_ids, jnp.zeros((b, num_tokens), prefix_ids.dtype)], axis=1)

  def step(carry, i):
    ids, rng = carry
    logits = logits_fn(ids)
    pos_logits = jax.lax.dynamic_index_in_dim(logits, p - 1 + i, axis=1, keepdims=False)
    rng, key = jax.random.split(rng)  # the same key sequence as `sample`
    token = sample_logits(key, pos_logits, temperature, top_k, top_p)
    ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None].astype(ids.dtype), p + i,
                                              axis=1)
    return (ids, rng), None

  (ids, _), _ = jax.lax.scan(step, (ids, rng), jnp.arange(num_tokens))
  return ids[:, p:].astype(jnp.int32)
