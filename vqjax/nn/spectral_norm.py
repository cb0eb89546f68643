"""Spectral normalisation (Miyato et al., 2018, "Spectral Normalization for Generative
Adversarial Networks", Sec. 2.1 and Algorithm 1), computed as BigGAN-PyTorch's `layers.SN`.

A weight W is viewed as a matrix [out, -1] (its output axis first, the other
axes flattened) and divided by sigma(W), its largest singular value,
estimated by power iteration with a vector u [out] that persists in a
mutable collection (the module field `collection`: 'disc_stats' in a
discriminator, 'gen_stats' in a generator):

    v = normalize(W^T u),  u <- normalize(W v),  sigma = u^T W v

One iteration per call when the call passes `update=True` and the
collection is mutable (training); otherwise none, and sigma comes from the
stored u. u and v are constants for the gradient (stop_gradient), which flows
through W in sigma (the paper's Eq. 12). u starts as a normalised normal draw.
Weights start orthogonal on their [out, -1] view (BigGAN-PyTorch's 'ortho',
torch's `init.orthogonal_`), biases at zero.

The layers compute in their input's dtype (bfloat16 under mixed precision):
sigma and W / sigma are computed in float32 from the float32 parameters, then
cast with the bias to x's dtype.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.nn.layers import CHANNEL_AXES, CONV_KERNEL_AXES, DENSE_KERNEL_AXES, named
from vqjax.ops import conv as fast_conv

sg = jax.lax.stop_gradient

# torch's init.orthogonal_ on the weight viewed [out, -1]: `column_axis` is the output axis.
ORTHO_KERNEL = nn.initializers.orthogonal(column_axis=-1)  # conv [kh, kw, in, out], dense [in, out]
ORTHO_EMBEDDING = nn.initializers.orthogonal(column_axis=0)  # embedding [classes, features]
EMBED_AXES = (None, "embed_out")  # class embeddings [classes, features]


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / max(||x||_2, eps), torch's `F.normalize` of a vector."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x))), eps)


def weight_matrix(w: jax.Array, out_axis: int) -> jax.Array:
  """W [..., out, ...] -> [out, -1]: the output axis first, the others flattened.

  The order of the flattened axes permutes the columns only, which changes
  neither sigma nor u.
  """
  moved = jnp.moveaxis(w, out_axis, 0)
  return moved.reshape(moved.shape[0], -1)


def sigma_estimate(w_mat: jax.Array, u: jax.Array, eps: float,
                   iterate: bool) -> tuple[jax.Array, jax.Array]:
  """(sigma, u to store) for W [out, n] and the stored u [out].

  v = normalize(W^T u); with `iterate`, u <- normalize(W v) (one power
  iteration); sigma = u^T W v, differentiable in W only.
  """
  w_const = sg(w_mat)
  v = l2_normalize(w_const.T @ u, eps)
  if iterate:
    u = l2_normalize(w_const @ v, eps)
  return sg(u) @ w_mat @ sg(v), u


def init_u(key: jax.Array, size: int, eps: float) -> jax.Array:
  """A normalised normal draw [size]."""
  return l2_normalize(jax.random.normal(key, (size,), jnp.float32), eps)


def spectral_normalize(module: nn.Module, w: jax.Array, out_axis: int,
                       u_axes: Sequence[str | None], update: bool) -> jax.Array:
  """W / sigma(W) inside `module`'s compact call; u is `module.collection`/u.

  `module` has the fields `collection` and `eps`; u is advanced only when
  `update`, the collection is mutable and the module is not initialising.
  """
  u_var = module.variable(
      module.collection, "u",
      named(lambda: init_u(module.make_rng("params"), w.shape[out_axis], module.eps), u_axes))
  iterate = (update and module.is_mutable_collection(module.collection)
             and not module.is_initializing())
  sigma, u = sigma_estimate(weight_matrix(w, out_axis), u_var.value, module.eps, iterate)
  if iterate:
    u_var.value = u
  return w / sigma


def _same_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """torch's padding = k // 2 on each side (odd kernels keep the size)."""
  return tuple((k // 2, k // 2) for k in kernel_size)


class SNConv(nn.Module):
  """2-D convolution (NHWC input, HWIO kernel, stride 1, padding k // 2) with a spectrally
  normalised kernel: BigGAN-PyTorch's `SNConv2d`. `__call__(x, update=False)`."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  collection: str = "disc_stats"
  eps: float = 1e-8
  kernel_init: Callable = ORTHO_KERNEL

  @nn.compact
  def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param("kernel", named(self.kernel_init, CONV_KERNEL_AXES), shape)
    kernel = spectral_normalize(self, kernel, -1, CHANNEL_AXES, update)
    y = fast_conv.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1),
                                       _same_padding(self.kernel_size),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", named(nn.initializers.zeros, CHANNEL_AXES), (self.features,))
      y = y + bias.astype(y.dtype)
    return y


class SNDense(nn.Module):
  """Linear layer [..., in] -> [..., features] with a spectrally normalised kernel [in, out]:
  BigGAN-PyTorch's `SNLinear`. `__call__(x, update=False)`."""

  features: int
  use_bias: bool = True
  collection: str = "disc_stats"
  eps: float = 1e-8
  kernel_init: Callable = ORTHO_KERNEL

  @nn.compact
  def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
    kernel = self.param("kernel", named(self.kernel_init, DENSE_KERNEL_AXES),
                        (x.shape[-1], self.features))
    kernel = spectral_normalize(self, kernel, -1, DENSE_KERNEL_AXES[1:], update)
    y = x @ kernel.astype(x.dtype)
    if self.use_bias:
      bias = self.param("bias", named(nn.initializers.zeros, DENSE_KERNEL_AXES[1:]),
                        (self.features,))
      y = y + bias.astype(y.dtype)
    return y


class SNEmbed(nn.Module):
  """Class embedding [num_embeddings, features] normalised as a matrix [num_embeddings, -1]
  (BigGAN-PyTorch's `SNEmbedding`: u has one entry per class). `__call__(labels, update=False)`
  -> [..., features]."""

  num_embeddings: int
  features: int
  collection: str = "disc_stats"
  eps: float = 1e-8
  embedding_init: Callable = ORTHO_EMBEDDING

  @nn.compact
  def __call__(self, labels: jax.Array, update: bool = False) -> jax.Array:
    table = self.param("embedding", named(self.embedding_init, EMBED_AXES),
                       (self.num_embeddings, self.features))
    table = spectral_normalize(self, table, 0, EMBED_AXES[:1], update)
    return jnp.take(table, labels, axis=0)
