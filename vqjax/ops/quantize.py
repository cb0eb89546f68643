"""Vector quantisation as pure functions (VQ-VAE / VQGAN, SPEC section 1).

Shapes: z [..., d] encoder outputs, codebook [K, d], indices [...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z_i - e_k||^2 for every row of z: [N, d] x [K, d] -> [N, K].

  Expanded as |z|^2 - 2 z.e + |e|^2 so that it is one matmul.
  """
  z_sq = jnp.sum(z * z, axis=-1, keepdims=True)  # [N, 1]
  e_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
  return z_sq - 2.0 * z @ codebook.T + e_sq[None, :]


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """argmin_k ||z - e_k||^2 over the last axis of z: [..., d] -> [...] int32."""
  flat = z.reshape(-1, z.shape[-1])
  idx = jnp.argmin(squared_distances(flat, codebook), axis=-1)
  return idx.reshape(z.shape[:-1]).astype(jnp.int32)


def lookup(indices: jax.Array, codebook: jax.Array) -> jax.Array:
  """e_{indices}: [...] -> [..., d]."""
  return jnp.take(codebook, indices, axis=0)


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
  """z + sg(z_q - z): forward value z_q, gradient of the identity to z."""
  return z + sg(z_q - z)


def vq_loss_terms(z: jax.Array, z_q: jax.Array, beta: float) -> dict[str, jax.Array]:
  """VQ-VAE Eq. 3 with beta on the commitment term (SPEC 1).

  codebook = ||sg(z) - z_q||^2, commitment = beta ||z - sg(z_q)||^2, each a
  mean over all elements. The sum is the quantiser loss when the codebook is
  learned by gradient; with EMA learning only the commitment term is used.
  """
  codebook = jnp.mean(jnp.square(sg(z) - z_q))
  commitment = beta * jnp.mean(jnp.square(z - sg(z_q)))
  return {"codebook": codebook, "commitment": commitment}


def ema_update(
    cluster_size: jax.Array,
    embed_sum: jax.Array,
    z_flat: jax.Array,
    onehot: jax.Array,
    decay: float,
    epsilon: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """EMA codebook update (VQ-VAE appendix A.1) with Laplace smoothing.

    N_k <- decay N_k + (1 - decay) n_k,          n_k = sum_i onehot_ik
    m_k <- decay m_k + (1 - decay) sum_i onehot_ik z_i
    N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j
    e_k = m_k / N~_k

  Args:
    cluster_size: N [K]; embed_sum: m [K, d]; z_flat: [N, d]; onehot: [N, K].
      Inside a jitted, sharded step z_flat and onehot are global arrays, so
      the sums run over the whole batch on every device (the data-axis
      reduction is done by the compiler).
  Returns:
    (new cluster_size, new embed_sum, new codebook).
  """
  counts = jnp.sum(onehot, axis=0)
  sums = onehot.T @ z_flat
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  k = cluster_size.shape[0]
  smoothed = (cluster_size + epsilon) / (total + k * epsilon) * total
  codebook = embed_sum / smoothed[:, None]
  return cluster_size, embed_sum, codebook


def code_histogram(indices: jax.Array, num_codes: int) -> jax.Array:
  """Counts of each code over all positions: [...] -> [K] float32."""
  return jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def perplexity(counts: jax.Array) -> jax.Array:
  """exp(H(p)) of the empirical code distribution p = counts / sum(counts)."""
  p = counts / jnp.maximum(jnp.sum(counts), 1e-12)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)


def usage_fraction(counts: jax.Array) -> jax.Array:
  """Fraction of codes hit at least once."""
  return jnp.mean((counts > 0).astype(jnp.float32))
