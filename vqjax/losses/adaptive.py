"""The adaptive GAN weight's last-layer gradients (VQGAN, Esser et al. 2021, Eq. 7)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.flatten_util

sg = jax.lax.stop_gradient


def last_layer_grad(layer: nn.Module, grad_output: jax.Array, features: jax.Array,
                    layer_params: dict) -> jax.Array:
  """d loss / d W of the decoder's last layer, given d loss / d x_hat, as one flat vector.

  x_hat = layer(features; W, b), so the weights' gradient is one VJP through
  that layer alone: no second pass through the decoder or the loss networks.
  `layer` is the decoder's `last_layer()`, `layer_params` its parameters; W is
  every parameter but the biases (VQGAN takes `last_layer.weight`), of any
  shape. All inputs are constants (the adaptive weight carries no gradient).
  """
  weights = {k: v for k, v in layer_params.items() if k != "bias"}
  rest = {k: v for k, v in layer_params.items() if k == "bias"}
  _, vjp = jax.vjp(lambda w: layer.apply({"params": {**w, **sg(rest)}}, sg(features)),
                   sg(weights))
  grads = vjp(sg(grad_output))[0]
  return jax.flatten_util.ravel_pytree(grads)[0]
