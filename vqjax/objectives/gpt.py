"""GPT: next-token prediction over raster-ordered codes (Esser et al. 2021, Sec. 3.2)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn.transformers import GPT
from vqjax.objectives.base import NOT_CONFIG, Objective
from vqjax.sampling import autoregressive


@registry.OBJECTIVES.register("gpt", not_config=NOT_CONFIG)
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class NextToken(Objective):
  """A causal transformer models p(s) = prod_i p(s_i | s_<i, c) (Esser et al. 2021,
  Sec. 3.2).

  Training is teacher forcing: one pass gives the logits of every token
  from the true tokens before it, and the loss is their mean cross-entropy
  (no label smoothing by default). Sampling runs the condition prefix once,
  then one token per step through the KV cache, with temperature, top-k,
  top-p and classifier-free guidance (`vqjax.sampling.autoregressive`).
  Teacher forcing also serves SeQ-GAN's visualisation (Sec. 3.2).

  Multichannel token maps [h, w, c] (MoVQ's "auto" scenario, Sec. 4.1) are
  modelled as one sequence of N = h w c indices over the shared codebook, in
  the order `order`: 'position_major' (MoVQ's raster order: the c channels
  of position (0, 0), then those of (0, 1), ...; a plain row-major reshape)
  or 'channel_major' (every position of channel 0, then of channel 1, ...).

  Model input ids, for codebook size K and condition vocabulary V:

    0 .. K-1           codes
    K+v, v in 0..V     condition id v (v = V: "no condition")

  The sequence is the L condition ids, then the N codes; the logits at
  positions L-1 .. L+N-2 predict the codes. An unconditional model has
  V = 0 and a prefix of one "no condition" id (id K), its start token.
  """
  order: str = "position_major"  # multichannel tokens: see the class docstring

  ORDERS: ClassVar[tuple[str, ...]] = ("position_major", "channel_major")
  teacher_forcing: ClassVar[bool] = True
  multichannel: ClassVar[bool] = True
  optim_defaults: ClassVar[dict[str, float]] = {"lr": 4.5e-4, "weight_decay": 0.01, "b2": 0.95}

  @staticmethod
  def check_config(cfg) -> None:
    if cfg.order not in NextToken.ORDERS:
      raise ConfigError(f"model.objective.order={cfg.order!r} must be one of "
                        f"{NextToken.ORDERS}.")

  @property
  def seq_len(self) -> int:
    """h w c: every (position, channel) index is one step of the sequence."""
    return int(np.prod(self.token_shape))

  @property
  def sequence_shape(self) -> tuple[int, ...]:
    return (self.seq_len,)

  def flatten(self, tokens):
    """[B, h, w(, c)] -> [B, h w c] in `order`."""
    if self.order == "channel_major" and tokens.ndim == 4:
      tokens = jnp.transpose(tokens, (0, 3, 1, 2))
    return tokens.reshape(tokens.shape[0], -1)

  def unflatten(self, sequences):
    """[B, h w c] in `order` -> [B, h, w(, c)]."""
    b = sequences.shape[0]
    if self.order == "channel_major" and len(self.token_shape) == 3:
      h, w, c = self.token_shape
      return jnp.transpose(sequences.reshape(b, c, h, w), (0, 2, 3, 1))
    return sequences.reshape((b,) + tuple(self.token_shape))

  def build_model(self) -> GPT:
    m, c = self.model_config, self.conditions
    return GPT(codebook_size=self.codebook_size, seq_len=self.seq_len,
               num_conditions=c.vocab if c.conditional else 0,
               cond_len=c.length if c.conditional else 1, width=m.width, depth=m.depth,
               heads=m.heads, mlp_dim=m.mlp_dim, dropout=m.dropout, dtype=self.dtype,
               remat=self.remat)

  def model_condition(self, cond):
    """The prefix's condition ids [B, L]; unconditional: the "no condition" start id [B, 1]."""
    if self.conditions.conditional:
      return cond
    return jnp.full((cond.shape[0], 1), self.model.num_conditions, jnp.int32)

  def forward(self, params, tokens, cond, mask_rng, dropout_rng, train: bool):
    """Teacher-forced next-token logits; every position counts."""
    del mask_rng  # nothing is masked
    logits = self.logits(params, tokens, cond, train, {"dropout": dropout_rng})
    return logits, jnp.ones(tokens.shape, bool)

  def sample(self, params, cond, rng, sample_config):
    s, model, b = sample_config, self.model, cond.shape[0]
    prefix = model.codebook_size + self.model_condition(cond)
    guided = s.guidance_scale != 0 and self.conditions.conditional
    uncond = model.codebook_size + self.conditions.unconditional(cond) if guided else None

    def decode_fn(ids, cache, index):
      return model.apply({"params": params}, ids, cache, index, method=GPT.decode)

    return autoregressive.sample(decode_fn, model.init_cache(2 * b if guided else b), prefix,
                                 self.seq_len, rng, s.temperature, s.top_k, s.top_p, uncond,
                                 s.guidance_scale)
