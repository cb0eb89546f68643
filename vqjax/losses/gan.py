"""GAN losses by name (`config.loss.gan.name`) and the discriminator regularisers R1, LeCam.

A GAN loss gives the discriminator's loss from real and fake logits and the
generator's loss from fake logits (SPEC section 1: hinge by default).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.ops import losses


@registry.GAN_LOSSES.register("hinge")
@dataclasses.dataclass(frozen=True)
class Hinge:
  """Hinge loss (Lim & Ye 2017) as in VQGAN.

  D: 0.5 (E relu(1 - D(x)) + E relu(1 + D(G))); G: -E D(G).
  """

  def d_loss(self, logits_real, logits_fake):
    return losses.hinge_d_loss(logits_real, logits_fake)

  def g_loss(self, logits_fake):
    return losses.hinge_g_loss(logits_fake)


@registry.GAN_LOSSES.register("non_saturating")
@dataclasses.dataclass(frozen=True)
class NonSaturating:
  """Goodfellow et al. 2014: D E softplus(-D(x)) + E softplus(D(G)), G E softplus(-D(G))."""

  def d_loss(self, logits_real, logits_fake):
    return jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake))

  def g_loss(self, logits_fake):
    return jnp.mean(jax.nn.softplus(-logits_fake))


def r1_penalty(logits_fn: Callable[[jax.Array], jax.Array], x_real: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018, Eq. 9 without gamma/2): E_x ||d sum D(x) / d x||^2.

  The gradient of the summed logits (all patches of an image) with respect to
  each real image, squared and summed over its pixels, averaged over images.
  Differentiable with respect to D's parameters (double backpropagation).
  """
  grads = jax.grad(lambda x: jnp.sum(logits_fn(x)))(x_real)
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))


def lecam_penalty(logits_real, logits_fake, ema_real, ema_fake) -> jax.Array:
  """LeCam regulariser (Tseng et al. 2021, Eq. 3):
  E ||D(x) - alpha_F||^2 + E ||D(G(z)) - alpha_R||^2, alpha the EMAs of D's mean outputs."""
  return (jnp.mean(jnp.square(logits_real - ema_fake))
          + jnp.mean(jnp.square(logits_fake - ema_real)))


def lecam_ema(ema: dict, logits_real, logits_fake, decay: float) -> dict:
  """Anchors after one step: alpha <- decay alpha + (1 - decay) mean D(.)."""
  return {"real": decay * ema["real"] + (1 - decay) * jnp.mean(logits_real),
          "fake": decay * ema["fake"] + (1 - decay) * jnp.mean(logits_fake)}
