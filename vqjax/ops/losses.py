"""Reconstruction and adversarial losses (VQGAN, SPEC section 1); token losses (section 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_loss(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """mean |x - x_hat|."""
  return jnp.mean(jnp.abs(x - x_hat))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: 0.5 (E relu(1 - D(x)) + E relu(1 + D(G(z))))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator hinge loss: -E D(G(z))."""
  return -jnp.mean(logits_fake)


def adaptive_weight(
    grad_rec: jax.Array, grad_gan: jax.Array, max_weight: float = 1e4, eps: float = 1e-4
) -> jax.Array:
  """VQGAN Eq. 7: ||grad_last L_rec|| / (||grad_last L_G|| + eps), clipped to [0, max].

  Gradients are taken with respect to the decoder's last layer; the result
  carries no gradient.
  """
  weight = jnp.linalg.norm(grad_rec.ravel()) / (jnp.linalg.norm(grad_gan.ravel()) + eps)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array,
                           label_smoothing: float = 0.0) -> jax.Array:
  """Per-entry cross-entropy against (1 - s) one_hot(target) + s / K. Returns logits.shape[:-1]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def masked_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                      label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """MaskGIT loss: mean smoothed cross-entropy over masked entries; also their top-1 accuracy.

  logits [B, N(, c), K], targets and mask [B, N(, c)] (mask True = masked).
  """
  w = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(smoothed_cross_entropy(logits, targets, label_smoothing) * w) / denom
  acc = jnp.sum((jnp.argmax(logits, -1) == targets) * w) / denom
  return loss, acc


def next_token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """AR loss: mean cross-entropy of [B, N, K] next-token logits; also top-1 accuracy."""
  loss = jnp.mean(smoothed_cross_entropy(logits, targets))
  return loss, jnp.mean(jnp.argmax(logits, -1) == targets)
