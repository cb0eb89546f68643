"""MaskGIT: masked-token modelling and iterative parallel decoding (Chang et al. 2022)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from vqjax import registry
from vqjax.nn.transformers import MaskGITTransformer
from vqjax.objectives.base import NOT_CONFIG, Objective
from vqjax.sampling import maskgit


@registry.OBJECTIVES.register("maskgit", not_config=NOT_CONFIG)
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MaskGIT(Objective):
  """A bidirectional transformer predicts masked tokens from the visible ones.

  Training (Chang et al. 2022, Sec. 3.2): per example a ratio cos(pi/2 u),
  u ~ U(0, 1), of the entries is replaced by the mask token, and the loss is
  the cross-entropy on the masked entries, with label smoothing (0.1 by
  default, as in the reference implementation). Multichannel tokens [N, c] (MoVQ Sec. 3.2) mask
  every (position, channel) entry on its own. Sampling (Sec. 3.2): `steps`
  rounds of parallel decoding that keep the most confident entries
  (`vqjax.sampling.maskgit.decode`), with classifier-free guidance.

  Model input ids, for codebook size K and condition vocabulary V:

    0 .. K-1           codes
    K                  mask token
    K+1+v, v in 0..V   condition id v (v = V: "no condition")

  The L condition ids come first, then the N token positions; the outputs
  at the L prefix positions are dropped. L = 1, V = num_classes is the
  paper's class token; an unconditional model has no prefix and K+1 ids.
  """
  label_smoothing: float = 0.1

  multichannel: ClassVar[bool] = True
  optim_defaults: ClassVar[dict[str, float]] = {"lr": 1e-4, "weight_decay": 0.045, "b2": 0.96}

  def build_model(self) -> MaskGITTransformer:
    m, c = self.model_config, self.conditions
    return MaskGITTransformer(
        codebook_size=self.codebook_size, seq_len=self.seq_len, channels=self.channels,
        num_conditions=c.vocab if c.conditional else 0, cond_len=c.length if c.conditional else 0,
        width=m.width, depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim, dropout=m.dropout,
        dtype=self.dtype, remat=self.remat)

  def model_condition(self, cond):
    return cond if self.conditions.conditional else None

  def forward(self, params, tokens, cond, mask_rng, dropout_rng, train: bool):
    """Logits of the tokens with a training mask drawn from `mask_rng`; weights = the mask."""
    mask = self.training_weights(mask_rng, tokens)
    return self.weighted_logits(params, tokens, cond, mask, dropout_rng, train), mask

  def training_weights(self, mask_rng, tokens):
    """The training mask (True = masked, counted by the loss)."""
    return maskgit.training_mask(mask_rng, tokens.shape)

  def weighted_logits(self, params, tokens, cond, weights, dropout_rng, train: bool):
    """Logits of the tokens with the masked entries (`weights`) replaced by the mask token."""
    inputs = jnp.where(weights, self.model.mask_id, tokens)
    return self.logits(params, inputs, cond, train, {"dropout": dropout_rng})

  def sample(self, params, cond, rng, sample_config):
    s, mask_id = sample_config, self.model.mask_id
    start = jnp.full((cond.shape[0],) + self.sequence_shape, mask_id, jnp.int32)
    logits_fn = lambda tokens: self.guided_logits(params, tokens, cond, s.guidance_scale)
    return maskgit.decode(logits_fn, start, mask_id, rng, s.steps, s.choice_temperature,
                          s.temperature)[0]
