"""Codebook-usage regularisers as pure functions (SeQ-GAN 3.4, Reg-VQ 3.1).

Both push the batch-average code distribution towards uniform; they differ in
where the per-position distribution comes from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vqjax.ops.quantize import squared_distances


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """H(p) = -sum_k p_k log p_k (nats), with 0 log 0 = 0."""
  safe = jnp.where(p > 0, p, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=axis)


def soft_code_assignment(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
  """SeQ-GAN 3.4: D_ik = softmax_k(-||z_i - e_k||^2); [N, d] x [K, d] -> [N, K]."""
  return jax.nn.softmax(-squared_distances(z_flat, codebook), axis=-1)


def codebook_entropy_penalty(probs: jax.Array) -> jax.Array:
  """SeQ-GAN 3.4 usage regulariser, log K - H(mean_i P_i), for probs P [N, K].

  0 when the average assignment is uniform, log K when every position picks
  the same code. The paper writes "L_vq' = L_vq + gamma H(D_bar)" while
  stating that it encourages a smoother D_bar; SPEC.md resolves the sign:
  the penalty *decreases* as the average entropy rises (gamma multiplies it
  in the quantiser).
  """
  k = probs.shape[-1]
  return jnp.log(float(k)) - entropy(jnp.mean(probs, axis=0))


def kl_to_uniform(probs: jax.Array) -> jax.Array:
  """Reg-VQ Eq. 1: KL(P_post || U) = sum_n p_n log(N p_n), P_post = mean_i P_i.

  probs [N, K] (per-position token distributions) -> scalar. Equal to
  log K - H(P_post). The paper averages one-hot vectors, which carry no
  gradient, so (per SPEC.md) the softmax of the logits is averaged instead.
  """
  p_post = jnp.mean(probs, axis=0)
  n = probs.shape[-1]
  safe = jnp.where(p_post > 0, p_post, 1.0)
  return jnp.sum(jnp.where(p_post > 0, p_post * jnp.log(n * safe), 0.0))
