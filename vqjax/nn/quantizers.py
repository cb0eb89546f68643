"""Quantiser modules, chosen by `config.model.quantizer.name` (SPEC sections 1-5).

| name           | method                                                     |
|----------------|------------------------------------------------------------|
| `vq`           | nearest code, straight-through; `loss` or `ema` codebook;  |
|                | options: SeQ-GAN entropy regulariser, l2 codes, k-means    |
|                | init, dead-code restart                                    |
| `multichannel` | MoVQ 3.1: c channel chunks, one shared codebook            |
| `regvq`        | Reg-VQ 3.1-3.2: logits head, stochastic-mask Gumbel tokens, |
|                | prior KL to uniform                                        |
| `fq`           | FQ-GAN 3.1-3.2: EMA dictionary (Eq. 8), `propagate` flag    |

Each registers under its name in `vqjax.registry.QUANTIZERS`; its dataclass
fields are its config fields. Every quantiser returns a `QuantizerOutput`,
so trainers never branch on the quantiser's name. The maths lives in `vqjax.ops.quantize` and
`vqjax.ops.regularizers`; these modules hold state and draw randomness.

Parameters and statistics carry logical axis names (`vqjax.nn.layers`):
codebooks and EMA sums (codes, code_dim), per-code counts (codes,), the
k-means flag none. Mutable state (EMA sums, usage counters, k-means flag,
codebook shifts) lives in the collection `vq_stats` and changes only when the caller makes it
mutable and passes `train=True`. Inside a jitted, sharded step the updates
are computed from the global batch, so every device holds the same state.
Random draws (Gumbel noise, masks, k-means seeds, restart picks) come from
the rng stream `quantizer`.

Gradient accumulation (`config.train.grad_accum`, `vqjax.train.accumulate`):
when the caller also makes the collection `stat_sums` (`STAT_SUMS`) mutable,
a training call adds its batch's statistics (code counts, and for EMA
codebooks and FQ dictionaries the per-code sums of the vectors, `vq.batch_sums`)
to those already in `stat_sums` and computes its new state from the totals.
The trainer gives every micro-batch the state from before the step (so each
looks codes up in the same codebook, as one big batch would) and the sums of
the micro-batches before it, and keeps the state of the last: one update from
the statistics of the whole batch, equal to the big batch's. What draws from
the batch (k-means initialisation, the vectors that restart dead codes) sees
only its own micro-batch; the last one's draws are kept.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn.layers import CODE_AXES, CODEBOOK_AXES, dense, named
from vqjax.ops import quantize as vq
from vqjax.ops import regularizers

sg = jax.lax.stop_gradient

STAT_SUMS = "stat_sums"  # statistics summed over micro-batches (module docstring)


class QuantizerOutput(NamedTuple):
  quantized: jax.Array  # [B, h, w, d], straight-through
  indices: jax.Array  # [B, h, w] int32, or [B, h, w, c] for multichannel
  losses: dict  # name -> scalar, already weighted; summed by the trainer
  metrics: dict  # name -> scalar
  aux: dict  # name -> per-position array [B, h, w] (e.g. Reg-VQ's sample distance)


def uniform_codebook_init(key, shape, dtype=jnp.float32):
  """U(-1/K, 1/K), the usual VQGAN codebook initialisation."""
  k = shape[0]
  return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)


def _usage_metrics(counts: jax.Array, error: jax.Array) -> dict:
  """Per-step metrics every quantiser reports, from its code counts [K]."""
  return {"usage_in_batch": vq.usage_fraction(counts), "perplexity": vq.perplexity(counts),
          "quant_error": error}


def _summed_statistics(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict:
  """In `setup`: {name: variable} of the statistics `module` sums over micro-batches, in
  `STAT_SUMS`; {} unless the caller made that collection mutable."""
  if not module.is_mutable_collection(STAT_SUMS) or module.is_initializing():
    return {}
  return {name: module.variable(STAT_SUMS, name, jnp.zeros, shape, jnp.float32)
          for name, shape in shapes.items()}


def _add_statistics(summed: dict, batch: dict) -> dict:
  """The batch's statistics (name -> array) without accumulation; with it (`summed`, from
  `_summed_statistics`), the sums over the micro-batches so far, this one included."""
  if not summed:
    return batch
  for name, value in batch.items():
    summed[name].value = summed[name].value + value
  return {name: summed[name].value for name in batch}


def check_quantizer_config(q) -> None:
  """Value ranges of `config.model.quantizer` (whichever of these fields it has)."""
  if q.embed_dim <= 0 or q.codebook_size <= 1:
    raise ConfigError("model.quantizer.embed_dim must be > 0 and codebook_size > 1.")
  checks = [
      ("learning", lambda v: v in ("loss", "ema"), "'loss' or 'ema'"),
      ("channels", lambda v: v >= 1 and q.embed_dim % v == 0,
       f"a divisor of embed_dim={q.embed_dim}"),
      ("restart_after", lambda v: v >= 0, ">= 0 (0 turns restarts off)"),
      ("kmeans_iters", lambda v: v >= 1, ">= 1"),
      ("entropy_weight", lambda v: v >= 0, ">= 0"),
      ("mask_ratio", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
      ("temperature", lambda v: v > 0, "> 0"),
      ("decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      ("ema_decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      ("ema_epsilon", lambda v: v > 0, "> 0"),
      ("beta", lambda v: v >= 0, ">= 0"),
  ]
  for field, ok, wanted in checks:
    if field in q and not ok(q[field]):
      raise ConfigError(f"model.quantizer.{field}={q[field]!r} must be {wanted}.")


@registry.QUANTIZERS.register("vq")
class VectorQuantizer(nn.Module):
  """Nearest-code quantiser (VQ-VAE / VQGAN) and its usage-improving options.

  learning='loss': the codebook is a parameter trained by ||sg(z) - z_q||^2.
  learning='ema': the codebook lives in `vq_stats` (cluster sizes, sums) and
  follows `vqjax.ops.quantize.ema_update`.
  entropy_weight > 0: adds gamma (log K - H(mean_i softmax_k(-d_ik))),
  SeQ-GAN 3.4.
  l2_normalize: inputs and codes are l2-normalised before the look-up
  (ViT-VQGAN "F&N"; the factorisation is the low `embed_dim` that the
  tokenizer's 1x1 convs project to and from).
  kmeans_init: the first training batch's vectors seed the codebook with
  `kmeans_iters` Lloyd rounds.
  restart_after > 0: codes unused for that many consecutive steps are
  re-seeded from the current batch's encoder outputs.

  With learning='loss', k-means and restarts cannot rewrite the parameter
  inside `apply`; they write `vq_stats/codebook_shift` instead, and the
  codebook used is `param + shift` (the gradient reaches the parameter
  unchanged).
  """

  codebook_size: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  learning: str = "loss"
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  entropy_weight: float = 0.0
  l2_normalize: bool = False
  kmeans_init: bool = False
  kmeans_iters: int = 10
  restart_after: int = 0

  # Hooks that MultichannelQuantizer overrides: the vectors that get quantised.
  def code_dim(self) -> int:
    return self.embed_dim

  def to_vectors(self, z: jax.Array) -> jax.Array:
    return z

  def from_vectors(self, v: jax.Array) -> jax.Array:
    return v

  def setup(self):
    shape = (self.codebook_size, self.code_dim())
    if self.learning == "loss":
      self.codebook_param = self.param("codebook", named(uniform_codebook_init, CODEBOOK_AXES),
                                       shape)
      if self.kmeans_init or self.restart_after > 0:
        self.codebook_shift = self.variable("vq_stats", "codebook_shift",
                                            named(jnp.zeros, CODEBOOK_AXES), shape)
    elif self.learning == "ema":
      self.codebook_var = self.variable(
          "vq_stats", "codebook",
          named(lambda: uniform_codebook_init(self.make_rng("params"), shape), CODEBOOK_AXES))
      self.embed_sum = self.variable("vq_stats", "embed_sum",
                                     named(lambda: self.codebook_var.value, CODEBOOK_AXES))
      self.cluster_size = self.variable(
          "vq_stats", "cluster_size",
          named(lambda: jnp.ones((self.codebook_size,), jnp.float32), CODE_AXES))
    else:
      raise ValueError(f"quantizer.learning must be 'loss' or 'ema', got {self.learning!r}")
    if self.kmeans_init:
      self.initialized = self.variable("vq_stats", "initialized", named(jnp.zeros, ()), (),
                                       jnp.int32)
    if self.restart_after > 0:
      self.unused_steps = self.variable(
          "vq_stats", "unused_steps", named(jnp.zeros, CODE_AXES), (self.codebook_size,),
          jnp.int32)
    summed = {}
    if self.learning == "ema":
      summed = {"counts": (self.codebook_size,), "sums": shape}
    elif self.restart_after > 0:
      summed = {"counts": (self.codebook_size,)}
    self.summed = _summed_statistics(self, summed)

  def raw_codebook(self) -> jax.Array:
    """The stored codebook [K, d'] (before l2 normalisation)."""
    if self.learning == "ema":
      return self.codebook_var.value
    if self.kmeans_init or self.restart_after > 0:
      return self.codebook_param + self.codebook_shift.value
    return self.codebook_param

  def codebook(self) -> jax.Array:
    """The codebook the look-up uses [K, d']."""
    raw = self.raw_codebook()
    return vq.l2_normalize(raw) if self.l2_normalize else raw

  def _replace_codes(self, new: jax.Array, which: jax.Array) -> None:
    """Set the stored codes where which [K] is True to new [K, d'].

    EMA sums are rewritten to match the current counts, so the next EMA
    step starts from `new`.
    """
    if self.learning == "loss":
      self.codebook_shift.value = jnp.where(
          which[:, None], sg(new - self.codebook_param), self.codebook_shift.value)
    else:
      self.codebook_var.value = jnp.where(which[:, None], new, self.codebook_var.value)
      self.embed_sum.value = jnp.where(
          which[:, None], new * self.cluster_size.value[:, None], self.embed_sum.value)

  def _kmeans_once(self, flat: jax.Array) -> None:
    """On the first training call: k-means of the batch's vectors becomes the codebook.

    With EMA learning the counts become the batch's cluster sizes (at least
    1), as if the EMA had seen that batch.
    """
    key = self.make_rng("quantizer")
    first = self.initialized.value == 0
    current = self.raw_codebook()
    centroids = jax.lax.cond(
        first, lambda: vq.kmeans(flat, vq.kmeans_init_centroids(key, flat, self.codebook_size),
                                 self.kmeans_iters),
        lambda: current)
    if self.learning == "ema":
      counts = vq.code_histogram(vq.nearest_code(flat, centroids), self.codebook_size)
      self.cluster_size.value = jnp.where(first, jnp.maximum(counts, 1.0),
                                          self.cluster_size.value)
    self._replace_codes(centroids, jnp.broadcast_to(first, (self.codebook_size,)))
    self.initialized.value = jnp.ones((), jnp.int32)

  def _update_state(self, flat: jax.Array, indices: jax.Array, counts: jax.Array) -> dict:
    metrics = {}
    if self.learning == "ema":
      onehot = jax.nn.one_hot(indices.reshape(-1), self.codebook_size, dtype=jnp.float32)
      n, sums = vq.batch_sums(flat, onehot)
      if self.summed:  # gradient accumulation: the totals over the micro-batches so far
        stats = _add_statistics(self.summed, {"counts": n, "sums": sums})
        n, sums, counts = stats["counts"], stats["sums"], stats["counts"]
      self.cluster_size.value, self.embed_sum.value, self.codebook_var.value = (
          vq.ema_from_sums(self.cluster_size.value, self.embed_sum.value, n, sums,
                           self.ema_decay, self.ema_epsilon))
    elif self.summed:
      counts = _add_statistics(self.summed, {"counts": counts})["counts"]
    if self.restart_after > 0:
      unused = vq.update_unused_steps(self.unused_steps.value, counts)
      new, dead = vq.restart_dead_codes(self.make_rng("quantizer"), self.raw_codebook(), unused,
                                        flat, self.restart_after)
      if self.learning == "ema":  # a restarted code starts with a count of 1
        self.cluster_size.value = jnp.where(dead, 1.0, self.cluster_size.value)
      self._replace_codes(new, dead)
      self.unused_steps.value = jnp.where(dead, 0, unused)
      metrics["restarted_codes"] = jnp.sum(dead.astype(jnp.float32))
    return metrics

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    if z.shape[-1] != self.embed_dim:
      raise ValueError(
          f"quantizer input has {z.shape[-1]} channels but model.quantizer.embed_dim is "
          f"{self.embed_dim}: set them to match.")
    v = self.to_vectors(z.astype(jnp.float32))  # [..., d']
    if self.l2_normalize:
      v = vq.l2_normalize(v)
    flat = v.reshape(-1, v.shape[-1])
    updating = (train and self.is_mutable_collection("vq_stats")
                and not self.is_initializing())
    if self.kmeans_init and updating:
      self._kmeans_once(sg(flat))
    codebook = self.codebook()
    indices = vq.nearest_code(v, codebook)
    v_q = vq.lookup(indices, codebook)
    terms = vq.vq_loss_terms(v, v_q, self.beta)
    losses = {"commitment": terms["commitment"]}
    if self.learning == "loss":
      losses["codebook"] = terms["codebook"]
    if self.entropy_weight > 0:
      probs = regularizers.soft_code_assignment(flat, codebook)
      losses["entropy"] = self.entropy_weight * regularizers.codebook_entropy_penalty(probs)
    error = jnp.mean(jnp.sum(jnp.square(v - v_q), axis=-1))
    counts = vq.code_histogram(indices, self.codebook_size)
    metrics = _usage_metrics(counts, error)
    if updating:
      metrics.update(self._update_state(sg(flat), indices, counts))
    quantized = self.from_vectors(vq.straight_through(v, v_q))
    return QuantizerOutput(quantized, indices, losses, metrics, {})

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Token indices -> the quantised tensor the decoder takes [..., embed_dim]."""
    return self.from_vectors(vq.lookup(indices, self.codebook()))


@registry.QUANTIZERS.register("multichannel")
class MultichannelQuantizer(VectorQuantizer):
  """MoVQ 3.1: z [..., n_z] is cut into `channels` chunks of n_z / c along the
  channel axis, each quantised with the same codebook [K, n_z / c]; tokens
  are [B, h, w, c]. `embed_dim` is n_z; every `vq` option applies per chunk.
  """

  channels: int = 4

  def code_dim(self) -> int:
    if self.embed_dim % self.channels:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by channels="
                       f"{self.channels}")
    return self.embed_dim // self.channels

  def to_vectors(self, z: jax.Array) -> jax.Array:
    return vq.split_channels(z, self.channels)

  def from_vectors(self, v: jax.Array) -> jax.Array:
    return vq.merge_channels(v)


@registry.QUANTIZERS.register("regvq")
class RegVQQuantizer(nn.Module):
  """Reg-VQ (3.1-3.2): a 1x1 head gives token logits P [B, h, w, K]; a
  Bernoulli(mask_ratio) mask picks the positions whose token is Gumbel-
  sampled from softmax(P) as argmax(P + g) (`vqjax.ops.quantize.stochastic_mask_quantize`);
  the rest take argmax P. Backward through softmax(P), and in the sampled
  region through softmax((P + g) / temperature) (Algorithm 1). Loss: prior_weight *
  KL(mean softmax(P) || uniform) (Eq. 1). Deterministic at eval.

  aux: `stochastic_mask` (1 where sampled) and `sample_distance`
  ||z_s - z_q||^2, the weights of the probabilistic contrastive loss.
  The paper gives no weight for the KL term; it is added with weight 1.
  """

  codebook_size: int = 1024
  embed_dim: int = 256
  mask_ratio: float = 0.4
  temperature: float = 0.9
  prior_weight: float = 1.0

  def setup(self):
    self.logits_head = dense(self.codebook_size, "code_dim", "codes")  # a 1x1 conv
    self.codebook_param = self.param("codebook", named(uniform_codebook_init, CODEBOOK_AXES),
                                     (self.codebook_size, self.embed_dim))

  def codebook(self) -> jax.Array:
    return self.codebook_param

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    z = z.astype(jnp.float32)
    logits = self.logits_head(z)
    if train:
      k_mask, k_gumbel = jax.random.split(self.make_rng("quantizer"))
      mask = jax.random.bernoulli(k_mask, self.mask_ratio, z.shape[:-1])
      gumbel = jax.random.gumbel(k_gumbel, logits.shape)
    else:
      mask = jnp.zeros(z.shape[:-1], bool)
      gumbel = jnp.zeros_like(logits)
    out = vq.stochastic_mask_quantize(logits, self.codebook_param, mask, gumbel,
                                      self.temperature)
    probs = jax.nn.softmax(logits, axis=-1).reshape(-1, self.codebook_size)
    losses = {"prior_kl": self.prior_weight * regularizers.kl_to_uniform(probs)}
    error = jnp.mean(jnp.sum(jnp.square(z - out["quantized"]), axis=-1))
    metrics = _usage_metrics(vq.code_histogram(out["indices"], self.codebook_size), error)
    metrics["stochastic_fraction"] = jnp.mean(mask.astype(jnp.float32))
    aux = {"stochastic_mask": mask.astype(jnp.float32),
           "sample_distance": out["sample_distance"]}
    return QuantizerOutput(out["quantized"], out["indices"], losses, metrics, aux)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return vq.lookup(indices, self.codebook_param)


@registry.QUANTIZERS.register("fq", not_config=("collection",))
class FeatureQuantizer(nn.Module):
  """FQ-GAN (3.1-3.2): nearest-neighbour look-up of features h [..., C] in a
  dictionary E [K, C] that follows the momentum update of Eq. 8 (decay
  lambda = 0.9), plus the commitment loss beta ||h - sg(e_k)||^2.

  propagate=True passes the quantised features on (Eq. 6, the paper);
  False returns h unchanged and only adds the loss (the released code).
  The dictionary starts N(0, 1) and its counts at 0. Its statistics live in
  `collection` ('vq_stats' in a tokenizer; a discriminator's FQ layers pass
  'disc_stats', `vqjax.nn.discriminators`); it is not a config field.
  """

  codebook_size: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  decay: float = 0.9
  propagate: bool = True
  collection: str = "vq_stats"

  def setup(self):
    shape = (self.codebook_size, self.embed_dim)
    self.dictionary = self.variable(
        self.collection, "dictionary",
        named(lambda: jax.random.normal(self.make_rng("params"), shape), CODEBOOK_AXES))
    self.embed_sum = self.variable(self.collection, "embed_sum",
                                   named(jnp.zeros, CODEBOOK_AXES), shape)
    self.cluster_size = self.variable(self.collection, "cluster_size",
                                      named(jnp.zeros, CODE_AXES), (self.codebook_size,))
    self.summed = _summed_statistics(self, {"counts": (self.codebook_size,), "sums": shape})

  def codebook(self) -> jax.Array:
    return self.dictionary.value

  def __call__(self, h: jax.Array, train: bool = False) -> QuantizerOutput:
    if h.shape[-1] != self.embed_dim:
      raise ValueError(f"FQ layer got {h.shape[-1]} channels, dictionary has {self.embed_dim}")
    h = h.astype(jnp.float32)
    indices = vq.nearest_code(h, self.dictionary.value)
    e = vq.lookup(indices, self.dictionary.value)
    losses = {"commitment": self.beta * jnp.mean(jnp.square(h - sg(e)))}
    error = jnp.mean(jnp.sum(jnp.square(h - e), axis=-1))
    metrics = _usage_metrics(vq.code_histogram(indices, self.codebook_size), error)
    if train and self.is_mutable_collection(self.collection) and not self.is_initializing():
      onehot = jax.nn.one_hot(indices.reshape(-1), self.codebook_size, dtype=jnp.float32)
      flat = sg(h.reshape(-1, h.shape[-1]))
      n, sums = vq.batch_sums(flat, onehot)
      if self.summed:  # gradient accumulation: the totals over the micro-batches so far
        stats = _add_statistics(self.summed, {"counts": n, "sums": sums})
        n, sums = stats["counts"], stats["sums"]
      self.cluster_size.value, self.embed_sum.value, self.dictionary.value = (
          vq.dictionary_ema_from_sums(self.cluster_size.value, self.embed_sum.value,
                                      self.dictionary.value, n, sums, self.decay))
    out = vq.straight_through(h, e) if self.propagate else h
    return QuantizerOutput(out, indices, losses, metrics, {})

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return vq.lookup(indices, self.dictionary.value)


for _quantizer in (VectorQuantizer, RegVQQuantizer, FeatureQuantizer):
  _quantizer.check_config = staticmethod(check_quantizer_config)
