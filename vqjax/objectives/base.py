"""The interface every token-transformer objective implements, and the condition prefix.

An objective bundles what differs between ways of modelling token maps
(MaskGIT's masked tokens, Chang et al. 2022; the GPT's next token, Esser et
al. 2021): the Flax model, how a training batch becomes logits and loss
weights, and how tokens are sampled. Everything else (conditions and their
dropout, the loss and validation sums, classifier-free guidance) is shared
here, so the trainer, the sampler and the visualiser never ask for a name.

Token maps are in the model's sequence layout: [B, N] or, for multichannel
tokens (MoVQ Sec. 3.2), [B, N, c], with N = h * w.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.ops.losses import masked_token_loss, smoothed_cross_entropy
from vqjax.sampling.maskgit import guided_logits

# An objective's fields that the trainer passes itself, so they are not config fields.
NOT_CONFIG = ("model_config", "token_shape", "codebook_size", "conditions", "dtype")


@dataclasses.dataclass(frozen=True)
class Conditions:
  """The condition prefix: `length` condition ids per example, each in 0..vocab.

  `kind` says where a batch's prefix comes from (`from_batch`):

    'class'          the class label, length 1 (vocab = model.num_classes)
    'semantic_map'   the token store's condition map ([h', w'] semantic ids, row-major;
                     length h' w'): Reg-VQ's semantic image synthesis, where the map's
                     ids downsampled to the token grid are the condition tokens

  Condition ids c[b, l] (an objective offsets them into its model's input
  vocabulary; see its docstring):

    0 .. vocab-1   conditions (class labels or semantic ids)
    vocab          reserved "no condition" id: it replaces the whole prefix of an example
                   under condition dropout in training and in the unconditional branch of
                   classifier-free guidance (Ho & Salimans 2022)

  vocab = 0 or length = 0 is an unconditional model (a [B, 0] prefix).
  """
  vocab: int = 0
  length: int = 0
  kind: str = "class"

  KINDS = ("class", "semantic_map")

  @property
  def conditional(self) -> bool:
    return self.vocab > 0 and self.length > 0

  @property
  def null_id(self) -> int:
    return self.vocab

  def from_labels(self, labels):
    """[B] class labels -> [B, 1] condition ids ([B, 0] for an unconditional model)."""
    labels = jnp.asarray(labels, jnp.int32)
    if not self.conditional:
      return jnp.zeros((labels.shape[0], 0), jnp.int32)
    if self.length != 1:
      raise ValueError(f"class labels are a prefix of length 1, not {self.length}")
    return labels[:, None]

  def from_batch(self, batch):
    """A batch's [B, L] condition ids: its 'condition' maps flattened row-major, or its labels."""
    if self.kind == "semantic_map" and self.conditional:
      cond = jnp.asarray(batch["condition"], jnp.int32)
      cond = cond.reshape(cond.shape[0], -1)
      if cond.shape[1] != self.length:
        raise ValueError(f"condition maps of {cond.shape[1]} ids, the prefix has {self.length}")
      return cond
    return self.from_labels(batch["label"])

  def unconditional(self, cond):
    """The "no condition" prefix of the same [B, L] shape as `cond`."""
    return jnp.full_like(cond, self.null_id)

  def drop(self, rng, cond, rate: float):
    """Condition dropout: each example's whole prefix becomes "no condition" with prob. `rate`.

    One Bernoulli draw per example ([B]), so guidance trains a fully unconditional model
    whatever the prefix length.
    """
    if not self.conditional:
      return cond
    dropped = jax.random.bernoulli(rng, rate, cond.shape[:1])
    return jnp.where(dropped[:, None], self.null_id, cond)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Objective(abc.ABC):
  """A token-transformer objective, built by the trainer from the config:

    registry.OBJECTIVES.build(config.model.objective, model_config=config.model,
                              token_shape=store.token_shape, codebook_size=K,
                              conditions=Conditions(vocab, length),
                              dtype=compute_dtype(config.precision))

  Its config fields (`config.model.objective`) are the dataclass fields with
  defaults; `model_config` (width, depth, heads, mlp_dim, dropout,
  cond_dropout, remat), the token shape, the codebook size, the conditions
  and the compute dtype (`dtype`, from `config.precision`) come from the
  trainer. Subclasses implement `build_model` (passing `dtype` and
  `model_config.remat` to the model), `model_condition`, `forward` and
  `sample`, and declare their capabilities.
  """
  model_config: Any
  token_shape: tuple[int, ...]  # one token map: (h, w) or (h, w, c)
  codebook_size: int
  conditions: Conditions
  dtype: Any = jnp.float32  # the model's compute dtype; parameters and losses stay float32
  label_smoothing: float = 0.0  # of the training cross-entropy (not of validation)

  # Capabilities and recipe defaults.
  teacher_forcing: ClassVar[bool] = False  # one pass gives every p(token_i | tokens_<i)
  multichannel: ClassVar[bool] = False  # models [h, w, c] token maps
  # The AdamW settings of its paper's recipe: {'lr': ..., 'weight_decay': ..., 'b2': ...}.
  optim_defaults: ClassVar[dict[str, float]]

  def __post_init__(self):
    if self.channels > 1 and not self.multichannel:
      names = registry.OBJECTIVES.names()
      mine = [n for n in names if registry.OBJECTIVES.get(n) is type(self)]
      able = [n for n in names if registry.OBJECTIVES.get(n).multichannel]
      raise ConfigError(
          f"model.objective.name={mine[0] if mine else type(self).__name__!r} models [h, w] "
          f"token maps, but the tokens are {tuple(self.token_shape)} (multichannel): use "
          f"an objective that models them, one of {able}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"model.objective.label_smoothing={self.label_smoothing} must be in "
                        "[0, 1).")

  @property
  def remat(self) -> str:
    """`model_config.remat`: 'block' recomputes every transformer block in the backward pass
    ('none' when the model config has no such field)."""
    return self.model_config.get("remat", "none")

  @property
  def channels(self) -> int:
    return self.token_shape[2] if len(self.token_shape) == 3 else 1

  @property
  def seq_len(self) -> int:
    return int(np.prod(self.token_shape[:2]))

  @property
  def sequence_shape(self) -> tuple[int, ...]:
    """One token map in the model's layout: (N,) or (N, c)."""
    return (self.seq_len,) + tuple(self.token_shape[2:])

  def flatten(self, tokens):
    """[B, h, w(, c)] token maps -> [B, N(, c)]."""
    return tokens.reshape((tokens.shape[0],) + self.sequence_shape)

  def unflatten(self, sequences):
    """The inverse of `flatten`: [B, N(, c)] -> [B, h, w(, c)] token maps."""
    return sequences.reshape((sequences.shape[0],) + tuple(self.token_shape))

  @functools.cached_property
  def model(self) -> nn.Module:
    return self.build_model()

  @abc.abstractmethod
  def build_model(self) -> nn.Module:
    """The Flax model, whose `__call__(tokens, model_condition(cond), train)` gives logits
    (float32)."""

  @abc.abstractmethod
  def model_condition(self, cond):
    """[B, L] condition ids -> the model's condition argument."""

  @abc.abstractmethod
  def forward(self, params, tokens, cond, mask_rng, dropout_rng, train: bool):
    """(logits [B, N(, c), K], weights [B, N(, c)]): the training predictions of `tokens` and
    which of them the loss counts."""

  @abc.abstractmethod
  def sample(self, params, cond, rng, sample_config):
    """[B, N(, c)] tokens for the condition prefix `cond` [B, L], with the settings of
    `config.sample` (classifier-free guidance with `guidance_scale` != 0)."""

  def init_params(self, rng, batch_size: int = 2):
    """Boxed (logically partitioned) parameters of `model`."""
    tokens = jnp.zeros((batch_size,) + self.sequence_shape, jnp.int32)
    cond = jnp.zeros((batch_size, self.conditions.length), jnp.int32)
    return self.model.init(rng, tokens, self.model_condition(cond))["params"]

  def logits(self, params, tokens, cond, train: bool = False, rngs=None):
    """The model's logits for its input `tokens` [B, N(, c)] and condition ids [B, L]."""
    return self.model.apply({"params": params}, tokens, self.model_condition(cond), train=train,
                            rngs=rngs)

  def guided_logits(self, params, tokens, cond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): l_c + scale (l_c - l_u), where l_u sees
    the "no condition" prefix; scale 0 (or an unconditional model) is l_c alone."""
    cond_logits = self.logits(params, tokens, cond)
    if scale == 0 or not self.conditions.conditional:
      return cond_logits
    uncond_logits = self.logits(params, tokens, self.conditions.unconditional(cond))
    return guided_logits(cond_logits, uncond_logits, scale)

  def loss(self, params, tokens, cond, rng, train: bool = True):
    """(mean smoothed cross-entropy over the weighted entries, their top-1 accuracy).

    In training, `model_config.cond_dropout` of the examples see "no condition".
    """
    r_mask, r_dropout, r_cond = jax.random.split(rng, 3)
    if train:
      cond = self.conditions.drop(r_cond, cond, self.model_config.cond_dropout)
    logits, weights = self.forward(params, tokens, cond, r_mask, r_dropout, train)
    return masked_token_loss(logits, tokens, weights, self.label_smoothing)

  # Gradient accumulation (config.train.grad_accum, vqjax.train.transformer_step): `loss`
  # in parts that add up over micro-batches. The random draws of the whole batch come
  # first, so micro-batches see the big batch's masks and condition dropout.

  def training_weights(self, mask_rng, tokens):
    """The weights `forward` gives `tokens` ([B, N(, c)] bool, True = the loss counts the
    entry), drawn from `mask_rng`; every entry by default."""
    del mask_rng
    return jnp.ones(tokens.shape, bool)

  def weighted_logits(self, params, tokens, cond, weights, dropout_rng, train: bool):
    """`forward`'s logits given its weights (`training_weights`); by default the model's
    logits of `tokens`. An objective whose weights change its input overrides this."""
    del weights
    return self.logits(params, tokens, cond, train, {"dropout": dropout_rng})

  def training_draws(self, tokens, cond, rng):
    """`loss`'s random draws in training for a whole batch: (the condition ids after
    condition dropout, the weights [B, N(, c)], the dropout rng)."""
    r_mask, r_dropout, r_cond = jax.random.split(rng, 3)
    cond = self.conditions.drop(r_cond, cond, self.model_config.cond_dropout)
    return cond, self.training_weights(r_mask, tokens), r_dropout

  def loss_sums(self, params, tokens, cond, weights, dropout_rng, train: bool = True):
    """(sum of the smoothed cross-entropy over the weighted entries, sum of their correct
    top-1), given `training_draws`' condition ids and weights of these rows: divided by the
    whole batch's weight sum, they add up over micro-batches to `loss`. The model's dropout
    draws from `dropout_rng` (per micro-batch: its own draws, from the same distribution)."""
    logits = self.weighted_logits(params, tokens, cond, weights, dropout_rng, train)
    w = weights.astype(jnp.float32)
    nll = smoothed_cross_entropy(logits, tokens, self.label_smoothing)
    return jnp.sum(nll * w), jnp.sum((jnp.argmax(logits, -1) == tokens) * w)

  def eval_sums(self, params, tokens, cond, valid, rng) -> dict:
    """Sums of unsmoothed NLL, correct top-1 and counted entries; `valid` [B] marks real rows.

    `rng` draws what the objective samples for the loss (e.g. MaskGIT's masks); a fixed rng
    per batch keeps the numbers comparable across evaluations.
    """
    logits, weights = self.forward(params, tokens, cond, rng, rng, train=False)
    valid = jnp.reshape(valid, (-1,) + (1,) * (tokens.ndim - 1))
    w = weights.astype(jnp.float32) * valid
    nll = smoothed_cross_entropy(logits, tokens, 0.0)
    correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
    return {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}
