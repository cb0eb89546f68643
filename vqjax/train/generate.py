"""Images from a token transformer: the tokenizer that decodes its tokens, and sample batches.

The tokenizer is named by `config.tokenizer` (its recipe and run directory)
and restored from its latest checkpoint. `ImageSampler` draws token maps with
the objective's sampler and decodes them with that tokenizer, under labels
that cycle through the classes or, for a model conditioned on semantic maps
(model.condition = 'semantic_map'), under the maps of the tokenizer's
validation images (`map_conditions`). The transformer
trainer imports this module for its sample grids and FID; `sample.py` and
`visualize.py` import the trainer, never the reverse.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.core import checkpoint, partitioning
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


def batch_conditions(objective, batch, condition_shape, n: int | None = None):
  """[n, L] condition ids of an image batch from the data pipeline: its label maps
  downsampled to `condition_shape` as --mode=tokenize stores them (semantic-map models), or
  its class labels."""
  n = batch["label"].shape[0] if n is None else n
  if objective.conditions.kind == "semantic_map" and objective.conditions.conditional:
    from vqjax.data.label_maps import downsample_nearest

    if "label_map" not in batch:
      raise ConfigError("the model is conditioned on semantic maps, but the tokenizer's data "
                        "has none: set data.label_maps and data.semantic_classes in its recipe")
    maps = downsample_nearest(np.asarray(batch["label_map"][:n]), tuple(condition_shape))
    return objective.conditions.from_batch({"condition": maps})
  return objective.conditions.from_labels(batch["label"][:n])


def map_conditions(tok_config, objective, condition_shape, batch_size: int):
  """Endless full batches of the tokenizer's validation images, in order, passes repeating
  (a batch may wrap around to the start): dicts of 'cond' [B, L], 'label' [B], 'image'
  [B, H, W, 3] and 'label_map' [B, H, W], for sampling a semantic-map model under real maps
  ([map | real | sample] grids, FID[G])."""
  from vqjax.data.pipeline import eval_batches

  keys = ("label", "image", "label_map")
  buffer = {k: [] for k in keys}
  held = 0
  while True:
    seen = 0
    for batch in eval_batches(tok_config, max_examples=0):
      n = int(batch["mask"].sum())
      seen += n
      for k in keys:
        buffer[k].append(np.asarray(batch[k][:n]))
      held += n
      while held >= batch_size:
        joined = {k: np.concatenate(v) for k, v in buffer.items()}
        out = {k: v[:batch_size] for k, v in joined.items()}
        buffer = {k: [v[batch_size:]] for k, v in joined.items()}
        held -= batch_size
        yield {"cond": batch_conditions(objective, out, condition_shape), **out}
    if not seen:
      raise ConfigError("the tokenizer's validation split has no images to take label maps "
                        "from: check its data.val_split")


def sample_conditions(objective, store, tok_config, batch_size: int):
  """The `conditions` argument of `ImageSampler.batches`: `map_conditions` for a model
  conditioned on semantic maps (the store's condition grid), None (cycled labels) otherwise."""
  if objective.conditions.kind == "semantic_map" and objective.conditions.conditional:
    return map_conditions(tok_config, objective, store.condition_shape, batch_size)
  return None


def decode_tokens(tok, variables, tokens) -> jax.Array:
  """[B, h, w(, c)] token maps -> [B, H, W, 3] images in [-1, 1], by the tokenizer."""
  return jnp.clip(tok.models.vqgan.apply(variables, tokens, method="decode_indices"), -1, 1)


class ImageSampler:
  """Condition-cycling batches of samples decoded to images; jitted once per batch shape."""

  def __init__(self, objective, sample_config, tok, variables):
    self.objective, self.variables = objective, variables
    self._draw = jax.jit(lambda p, cond, r: objective.sample(p, cond, r, sample_config))
    self._decode = jax.jit(lambda v, t: decode_tokens(tok, v, t))

  def batches(self, params, num: int, batch_size: int, seed: int, conditions=None):
    """Yields (images [B,H,W,3] in [-1,1], tokens [B,h,w(,c)], labels [B], valid) until `num`
    images; every batch is full and the first `valid` rows count (the last batch's extras
    are surplus). Labels cycle through the classes (0s if unconditional), unless
    `conditions` (an iterator of dicts with 'cond' [B, L] and 'label' [B], e.g.
    `map_conditions`) gives each batch's prefix."""
    classes = max(self.objective.conditions.vocab, 1)
    for i, start in enumerate(range(0, num, batch_size)):
      if conditions is None:
        labels = (jnp.arange(start, start + batch_size) % classes).astype(jnp.int32)
        cond = self.objective.conditions.from_labels(labels)
      else:
        given = next(conditions)
        labels, cond = jnp.asarray(given["label"], jnp.int32), given["cond"]
      t = self._draw(params, cond, jax.random.fold_in(jax.random.PRNGKey(seed), i))
      t = self.objective.unflatten(t)
      images = partitioning.fetch(self._decode(self.variables, t))
      yield images, partitioning.fetch(t), np.asarray(labels), min(batch_size, num - start)
