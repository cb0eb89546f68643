"""Quantiser modules, chosen by `config.model.quantizer.name` (SPEC section 1).

Every quantiser returns a `QuantizerOutput`, so trainers never branch on the
quantiser's name.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.ops import quantize as vq


class QuantizerOutput(NamedTuple):
  quantized: jax.Array  # [B, h, w, d], straight-through
  indices: jax.Array  # [B, h, w] int32
  losses: dict  # name -> scalar, already weighted; summed by the trainer
  metrics: dict  # name -> scalar


def uniform_codebook_init(key, shape, dtype=jnp.float32):
  """U(-1/K, 1/K), the usual VQGAN codebook initialisation."""
  k = shape[0]
  return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)


class VectorQuantizer(nn.Module):
  """Nearest-code quantiser with a `loss`- or `ema`-learned codebook.

  `learning='loss'`: the codebook is a parameter trained by
  ||sg(z) - z_q||^2. `learning='ema'`: the codebook lives in the mutable
  collection `vq_stats` (cluster sizes, embedding sums, codebook) and is
  updated by `vqjax.ops.quantize.ema_update` only when that collection is
  mutable and `train=True`.
  """

  codebook_size: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  learning: str = "loss"
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5

  def setup(self):
    shape = (self.codebook_size, self.embed_dim)
    if self.learning == "loss":
      self.codebook_param = self.param("codebook", uniform_codebook_init, shape)
    elif self.learning == "ema":
      self.codebook_var = self.variable(
          "vq_stats", "codebook", lambda: uniform_codebook_init(self.make_rng("params"), shape))
      self.embed_sum = self.variable("vq_stats", "embed_sum", lambda: self.codebook_var.value)
      self.cluster_size = self.variable(
          "vq_stats", "cluster_size", lambda: jnp.ones((self.codebook_size,), jnp.float32))
    else:
      raise ValueError(f"quantizer.learning must be 'loss' or 'ema', got {self.learning!r}")

  def codebook(self) -> jax.Array:
    """The current codebook [K, d]."""
    return self.codebook_param if self.learning == "loss" else self.codebook_var.value

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    if z.shape[-1] != self.embed_dim:
      raise ValueError(
          f"quantizer input has {z.shape[-1]} channels but the codebook dim is "
          f"{self.embed_dim}: set model.quantizer.embed_dim to match.")
    codebook = self.codebook()
    z = z.astype(jnp.float32)
    indices = vq.nearest_code(z, codebook)
    z_q = vq.lookup(indices, codebook)
    terms = vq.vq_loss_terms(z, z_q, self.beta)
    losses = {"commitment": terms["commitment"]}
    if self.learning == "loss":
      losses["codebook"] = terms["codebook"]

    counts = vq.code_histogram(indices, self.codebook_size)
    if (self.learning == "ema" and train and self.is_mutable_collection("vq_stats")
        and not self.is_initializing()):
      onehot = jax.nn.one_hot(indices.reshape(-1), self.codebook_size, dtype=jnp.float32)
      z_flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
      self.cluster_size.value, self.embed_sum.value, self.codebook_var.value = vq.ema_update(
          self.cluster_size.value, self.embed_sum.value, z_flat, onehot, self.ema_decay,
          self.ema_epsilon)

    metrics = {
        "usage_in_batch": vq.usage_fraction(counts),
        "perplexity": vq.perplexity(counts),
        "quant_error": jnp.mean(jnp.sum(jnp.square(z - z_q), axis=-1)),
    }
    return QuantizerOutput(vq.straight_through(z, z_q), indices, losses, metrics)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """indices [...] -> code vectors [..., d]."""
    return vq.lookup(indices, self.codebook())


QUANTIZERS: dict[str, Callable[..., nn.Module]] = {
    "vq": VectorQuantizer,
}


def build_quantizer(cfg) -> nn.Module:
  """Quantiser from `config.model.quantizer` (a ConfigDict with a `name`)."""
  kwargs = dict(cfg)
  name = kwargs.pop("name")
  if name not in QUANTIZERS:
    raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
  return QUANTIZERS[name](**kwargs)
