"""Reg-VQ's contrastive losses over feature patches (Sec. 3.3, Eq. 2 and Eq. 3), pure functions.

With y_i the feature of the ORIGINAL image at location i (the anchor), z_i
the reconstruction's feature at the same location (the positive) and z_j,
j != i, the reconstruction's features elsewhere (the negatives), each
l2-normalised over channels, and tau the temperature:

    CL   (Eq. 2)  -1/L sum_i log e^{y_i.z_i/tau}
                             / (e^{y_i.z_i/tau} + sum_{j != i} e^{y_i.z_j/tau})
    PCL  (Eq. 3)  -sum_i log w'_i e^{y_i.z_i/tau}
                             / (w'_i e^{y_i.z_i/tau} + 1/L sum_{j != i} e^{y_i.z_j/tau})

with w'_i the weights normalised to sum 1 (Reg-VQ: w_i = ||z_s - z_q||^2, the
distance of the Gumbel-sampled token to the best-matching one). Eq. 3 sums
over i; here PCL is AVERAGED over i, as Eq. 2 is: with equal weights
(w'_i = 1/L) the numerator and every negative are scaled by 1/L, so PCL then
equals CL exactly and both rows of Table 2 can share one loss weight.

The L locations are sampled (`sample_locations`) with a fixed count, so each
function takes a validity mask: invalid entries are neither anchors nor
negatives, L counts the valid ones, and no valid location gives 0. Both are
computed in float32 in log space (logsumexp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_EPS = 1e-6  # added to every w_i before normalising (all-zero weights: w'_i = 1/L)


def l2_normalize(f: jax.Array, eps: float = 1e-12) -> jax.Array:
  """f / ||f|| over the last axis, float32; an all-zero vector stays zero (finite gradient)."""
  f = f.astype(jnp.float32)
  return f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps)


def _similarities(y: jax.Array, z: jax.Array, tau: float) -> jax.Array:
  """[L, L]: y_i . z_j / tau in float32."""
  y, z = y.astype(jnp.float32), z.astype(jnp.float32)
  return jnp.matmul(y, z.T, precision=jax.lax.Precision.HIGHEST) / tau


def _average_over_valid(per_anchor: jax.Array, valid: jax.Array) -> jax.Array:
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(count, 1)


def _negative_log_softmax_of_diagonal(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """[L]: -log(e^{logits_ii} / sum_{j valid or j = i} e^{logits_ij}); the diagonal is always
  kept so that an invalid row stays finite (it is then left out of the average)."""
  eye = jnp.eye(logits.shape[0], dtype=bool)
  kept = jnp.where(valid[None, :] | eye, logits, -jnp.inf)
  return jax.nn.logsumexp(kept, axis=1) - jnp.diagonal(logits)


def contrastive_loss(y: jax.Array, z: jax.Array, valid: jax.Array, tau: float) -> jax.Array:
  """Eq. 2 (vanilla CL): y, z [L, C] l2-normalised, valid [L] bool -> scalar, the mean over
  valid anchors i of -log softmax_j(y_i . z_j / tau)[i] over valid j."""
  logits = _similarities(y, z, tau)
  return _average_over_valid(_negative_log_softmax_of_diagonal(logits, valid), valid)


def normalized_weights_log(w: jax.Array, valid: jax.Array) -> jax.Array:
  """[L]: log w'_i with w' = (w + 1e-6) / sum_valid (w + 1e-6) (w >= 0; clipped at 0)."""
  w = jnp.maximum(w.astype(jnp.float32), 0.0) + WEIGHT_EPS
  total = jnp.sum(jnp.where(valid, w, 0.0))
  return jnp.log(w) - jnp.log(jnp.maximum(total, WEIGHT_EPS))


def probabilistic_contrastive_loss(y: jax.Array, z: jax.Array, valid: jax.Array,
                                   w: jax.Array, tau: float) -> jax.Array:
  """Eq. 3 (PCL), averaged over valid anchors: y, z [L, C] l2-normalised, valid [L] bool,
  w [L] >= 0 -> scalar mean over valid i of
  -log(w'_i e^{s_ii} / (w'_i e^{s_ii} + 1/L sum_{j != i valid} e^{s_ij})), s = y.z^T / tau,
  L the number of valid locations. Equal weights give `contrastive_loss`."""
  logits = _similarities(y, z, tau)
  num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  eye = jnp.eye(logits.shape[0], dtype=bool)
  scaled = jnp.where(eye, logits + normalized_weights_log(w, valid)[:, None],
                     logits - jnp.log(num_valid))
  return _average_over_valid(_negative_log_softmax_of_diagonal(scaled, valid), valid)


def sample_locations(rng: jax.Array, region: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """`num` flat indices into region [Hf, Wf] (bool), uniformly without replacement inside it,
  and a validity mask [num] (False for the slots beyond the region's size).

  The top `num` of uniform noise with -inf outside the region: fixed shapes
  (jit-able). When the map has fewer than `num` locations the surplus slots
  are index 0, invalid.
  """
  flat = region.reshape(-1)
  k = min(num, flat.shape[0])
  noise = jax.random.uniform(rng, flat.shape)
  scores, indices = jax.lax.top_k(jnp.where(flat, noise, -jnp.inf), k)
  valid = jnp.isfinite(scores)
  if k < num:
    indices = jnp.pad(indices, (0, num - k))
    valid = jnp.pad(valid, (0, num - k))
  return indices.astype(jnp.int32), valid


def token_cells(feature_hw: tuple[int, int], token_hw: tuple[int, int]) -> np.ndarray:
  """[Hf, Wf] int32: the flat index (row-major over the token grid [h, w]) of the token cell
  under each feature location, row floor(i h / Hf), column floor(j w / Wf)."""
  (hf, wf), (h, w) = feature_hw, token_hw
  rows = (np.arange(hf) * h) // hf
  cols = (np.arange(wf) * w) // wf
  return (rows[:, None] * w + cols[None, :]).astype(np.int32)
