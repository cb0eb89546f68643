"""Images from a token transformer: the tokenizer that decodes its tokens, and sample batches.

The tokenizer is named by `config.tokenizer` (its recipe and run directory)
and restored from its latest checkpoint. `ImageSampler` draws token maps with
the objective's sampler and decodes them with that tokenizer. The transformer
trainer imports this module for its sample grids and FID; `sample.py` and
`visualize.py` import the trainer, never the reverse.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.core import checkpoint
from vqjax.core.config_files import load_config_file
from vqjax.errors import CheckpointNotFoundError, ConfigError


def require_checkpoints(workdir: str, what: str) -> None:
  """Stop, naming the folder, if `workdir` has no checkpoint of `what` yet."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder) or not any(name.isdigit() for name in os.listdir(folder)):
    raise CheckpointNotFoundError(f"no {what} checkpoint in {folder}: train it first, or point "
                                  "the config at its run directory")


def restore_latest(workdir: str, template, what: str):
  """(state shaped and placed like `template`, step) of the newest checkpoint in `workdir`
  that restores (damaged newer ones are moved aside: `checkpoint.restore_newest_good`)."""
  require_checkpoints(workdir, what)
  state, _, step = checkpoint.restore_newest_good(workdir, template, with_data=False)
  return state, step


def restore_tokenizer(config):
  """The tokenizer named in `config.tokenizer`, restored: (setup, its config, variables)."""
  from vqjax.train import run
  from vqjax.train.tokenizer import tokenizer_variables

  if not config.tokenizer.config or not config.tokenizer.workdir:
    raise ConfigError("set config.tokenizer.config (the tokenizer recipe) and "
                      "config.tokenizer.workdir (its run directory) to decode tokens")
  require_checkpoints(config.tokenizer.workdir, "tokenizer")  # before building anything
  tok_config = load_config_file(config.tokenizer.config).copy_and_resolve_references()
  with tok_config.unlocked():
    tok_config.eval.fid = False
  tok = run.setup(tok_config)
  tok_state, _ = restore_latest(config.tokenizer.workdir, tok.state, "tokenizer")
  variables = tokenizer_variables(tok_state)
  return tok, tok_config, variables


def decode_tokens(tok, variables, tokens) -> jax.Array:
  """[B, h, w(, c)] token maps -> [B, H, W, 3] images in [-1, 1], by the tokenizer."""
  return jnp.clip(tok.models.vqgan.apply(variables, tokens, method="decode_indices"), -1, 1)


class ImageSampler:
  """Condition-cycling batches of samples decoded to images; jitted once per batch shape."""

  def __init__(self, objective, sample_config, tok, variables):
    self.objective, self.variables = objective, variables
    self._draw = jax.jit(lambda p, cond, r: objective.sample(p, cond, r, sample_config))
    self._decode = jax.jit(lambda v, t: decode_tokens(tok, v, t))

  def batches(self, params, num: int, batch_size: int, seed: int):
    """Yields (images [B,H,W,3] in [-1,1], tokens [B,h,w(,c)], labels [B], valid) until `num`
    images; every batch is full and the first `valid` rows count (the last batch's extras
    are surplus). Labels cycle through the classes (0s if unconditional)."""
    conditions = self.objective.conditions
    classes = max(conditions.vocab, 1)
    for i, start in enumerate(range(0, num, batch_size)):
      labels = (jnp.arange(start, start + batch_size) % classes).astype(jnp.int32)
      t = self._draw(params, conditions.from_labels(labels),
                     jax.random.fold_in(jax.random.PRNGKey(seed), i))
      t = self.objective.unflatten(t)
      images = np.asarray(jax.device_get(self._decode(self.variables, t)))
      yield images, np.asarray(t), np.asarray(labels), min(batch_size, num - start)
