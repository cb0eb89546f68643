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
  counts, sums = batch_sums(z_flat, onehot)
  return ema_from_sums(cluster_size, embed_sum, counts, sums, decay, epsilon)


def batch_sums(z_flat: jax.Array, onehot: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The statistics an EMA codebook or dictionary update adds up over a batch: the counts
  n_k = sum_i onehot_ik [K] and the sums sum_i onehot_ik z_i [K, d]. Both add over
  micro-batches, so accumulated ones give the update of their union (`ema_from_sums`)."""
  return jnp.sum(onehot, axis=0), onehot.T @ z_flat


def ema_from_sums(cluster_size: jax.Array, embed_sum: jax.Array, counts: jax.Array,
                  sums: jax.Array, decay: float,
                  epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`ema_update` given the batch's `batch_sums` (counts [K], sums [K, d])."""
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


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """x / max(||x||_2, eps) along `axis` (ViT-VQGAN's l2-normalised codes)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def split_channels(z: jax.Array, channels: int) -> jax.Array:
  """MoVQ 3.1: [..., n_z] -> [..., c, n_z / c], c chunks along the channel axis."""
  if z.shape[-1] % channels:
    raise ValueError(f"{z.shape[-1]} channels cannot be split into {channels} equal chunks")
  return z.reshape(z.shape[:-1] + (channels, z.shape[-1] // channels))


def merge_channels(z: jax.Array) -> jax.Array:
  """Inverse of `split_channels`: [..., c, n_z / c] -> [..., n_z]."""
  return z.reshape(z.shape[:-2] + (z.shape[-2] * z.shape[-1],))


def kmeans_init_centroids(key: jax.Array, points: jax.Array, num_clusters: int) -> jax.Array:
  """num_clusters distinct rows of points [N, d] (with replacement only if N < K)."""
  n = points.shape[0]
  idx = jax.random.choice(key, n, (num_clusters,), replace=n < num_clusters)
  return points[idx]


def kmeans(points: jax.Array, centroids: jax.Array, num_iters: int) -> jax.Array:
  """Lloyd's k-means: `num_iters` rounds of assign-to-nearest and mean.

  points [N, d], centroids [K, d] (the initial guess) -> centroids [K, d].
  A cluster that receives no point keeps its previous centroid.
  """
  k = centroids.shape[0]

  def one_round(_, c):
    onehot = jax.nn.one_hot(jnp.argmin(squared_distances(points, c), axis=-1), k,
                            dtype=points.dtype)
    counts = jnp.sum(onehot, axis=0)
    means = (onehot.T @ points) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, c)

  return jax.lax.fori_loop(0, num_iters, one_round, centroids)


def update_unused_steps(unused_steps: jax.Array, counts: jax.Array) -> jax.Array:
  """Steps since each code was last selected: 0 where counts [K] > 0, else +1."""
  return jnp.where(counts > 0, 0, unused_steps + 1)


def restart_dead_codes(
    key: jax.Array,
    codebook: jax.Array,
    unused_steps: jax.Array,
    recent: jax.Array,
    restart_after: int,
) -> tuple[jax.Array, jax.Array]:
  """Dead-code restart: codes unused for >= restart_after steps become encoder outputs.

  codebook [K, d], unused_steps [K], recent [N, d] (recent encoder outputs).
  Each dead code is replaced by a uniformly drawn row of `recent`.
  Returns (codebook, dead [K] bool).
  """
  dead = unused_steps >= restart_after
  draws = recent[jax.random.randint(key, (codebook.shape[0],), 0, recent.shape[0])]
  return jnp.where(dead[:, None], draws.astype(codebook.dtype), codebook), dead


def dictionary_ema_update(
    cluster_size: jax.Array,
    embed_sum: jax.Array,
    dictionary: jax.Array,
    h_flat: jax.Array,
    onehot: jax.Array,
    decay: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FQ-GAN Eq. 8, momentum update of the dictionary (no smoothing):

    m_k <- lambda m_k + (1 - lambda) sum_{i: k(i) = k} h_i
    N_k <- lambda N_k + (1 - lambda) n_k
    e_k <- m_k / N_k

  A code whose N_k is 0 (never selected yet, or decayed to underflow) keeps
  its previous e_k instead of dividing by zero.
  Args: cluster_size N [K]; embed_sum m [K, C]; dictionary e [K, C];
    h_flat [N, C]; onehot [N, K].
  """
  counts, sums = batch_sums(h_flat, onehot)
  return dictionary_ema_from_sums(cluster_size, embed_sum, dictionary, counts, sums, decay)


def dictionary_ema_from_sums(cluster_size: jax.Array, embed_sum: jax.Array,
                             dictionary: jax.Array, counts: jax.Array, sums: jax.Array,
                             decay: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`dictionary_ema_update` given the batch's `batch_sums` (counts [K], sums [K, C])."""
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  used = cluster_size > 0
  safe = jnp.where(used, cluster_size, 1.0)
  dictionary = jnp.where(used[:, None], embed_sum / safe[:, None], dictionary)
  return cluster_size, embed_sum, dictionary


def softmax_straight_through(hard_indices: jax.Array, soft_probs: jax.Array,
                             codebook: jax.Array) -> jax.Array:
  """Reg-VQ Algorithm 1: forward one_hot(index) @ Z, backward soft @ Z.

  hard_indices [...], soft_probs [..., K], codebook [K, d] -> [..., d].
  Value: Z[index]. Gradient with respect to soft_probs and codebook: that
  of soft_probs @ Z.
  """
  soft = soft_probs @ codebook
  return soft + sg(lookup(hard_indices, codebook) - soft)


def stochastic_mask_quantize(
    logits: jax.Array,
    codebook: jax.Array,
    mask: jax.Array,
    gumbel: jax.Array,
    temperature: float,
) -> dict[str, jax.Array]:
  """Reg-VQ 3.2: argmax tokens where mask == 0, Gumbel-sampled tokens where mask == 1.

  logits P [..., K], codebook Z [K, d], mask M [...] (1 = stochastic region),
  gumbel g [..., K] ~ Gumbel(0, 1).

  Deterministic region: index = argmax P, backward through softmax(P).
  Stochastic region (Algorithm 1): index = argmax(P + g), so the index is a
  sample of softmax(P); backward through the Gumbel-softmax relaxation
  softmax((P + g) / tau) with the same g. The temperature tau (0.9 in the
  paper's supplement, "in Gumbel-Softmax") shapes only the relaxation, never
  which token is drawn.

  Returns dict(indices, best_indices, quantized (straight-through),
  sample_distance = ||Z[indices] - Z[best_indices]||^2, 0 where M == 0).
  """
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  perturbed = logits + gumbel
  sampled = jnp.argmax(perturbed, axis=-1).astype(jnp.int32)
  stochastic = mask.astype(bool)
  indices = jnp.where(stochastic, sampled, best)
  soft = jnp.where(stochastic[..., None], jax.nn.softmax(perturbed / temperature, axis=-1),
                   jax.nn.softmax(logits, axis=-1))
  quantized = softmax_straight_through(indices, soft, codebook)
  z_s, z_q = lookup(indices, sg(codebook)), lookup(best, sg(codebook))
  return {
      "indices": indices,
      "best_indices": best,
      "quantized": quantized,
      "sample_distance": jnp.sum(jnp.square(z_s - z_q), axis=-1),
  }
