"""Reconstruction and adversarial losses (VQGAN, SPEC section 1)."""

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
