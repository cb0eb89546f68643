"""--mode=tokenize: a trained tokenizer's indices for a whole split, into a token store.

The split is read in a fixed order with the evaluation preprocessing (no
flips; crops as `data.eval_random_crop` says). Indices ([h, w], or [h, w, c]
for multichannel quantisers) and labels go to a `vqjax.data.tokens` store;
with label maps in the data (data.label_maps), each map's semantic ids
downsampled to the token grid (nearest neighbour, the id at each cell's
centre) are stored beside the tokens as the condition map of Reg-VQ's
semantic image synthesis;
a killed run resumes after the last finished shard. The store records the
data description and the checkpoint step, so tokens from another tokenizer
or data set are never appended to it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vqjax.console import console
from vqjax.core import partitioning
from vqjax.data.label_maps import downsample_nearest
from vqjax.data.pipeline import eval_batches
from vqjax.data.tokens import TokenStoreWriter
from vqjax.eval.inception_features import data_description, progress_bar
from vqjax.nn.vqgan import VQGAN
from vqjax.train.tokenizer import tokenizer_variables


def token_dir(config, workdir: str) -> str:
  return config.tokenize.output_dir or os.path.join(workdir, f"tokens_{config.tokenize.split}")


def tokenize(config, workdir: str) -> str:
  """Write the token store for `config.tokenize.split`; returns its folder."""
  from vqjax.train.run import restore_for_eval, setup

  if jax.process_count() > 1:
    raise ValueError("--mode=tokenize writes one store from one process: run it on a single "
                     "host (it is a single pass over the split)")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.fid = False  # not needed here; skips loading the Inception weights
  s = setup(config)
  state, step = restore_for_eval(config, workdir, s)
  t = config.tokenize
  variables = tokenizer_variables(state)
  batch_sh = partitioning.batch_sharding(s.mesh)
  encode = jax.jit(lambda v, x: s.models.vqgan.apply(v, x, method=VQGAN.encode).indices,
                   out_shardings=batch_sh)
  size = config.data.image_size
  shape = jax.eval_shape(encode, variables, jnp.zeros((t.batch_size, size, size, 3))).shape[1:]
  folder = token_dir(config, workdir)
  grid = tuple(shape[:2]) if config.data.label_maps else None  # condition maps: token grid
  writer = TokenStoreWriter(
      folder, shape, config.model.quantizer.codebook_size, t.shard_size,
      source={"data": data_description(config, t.split), "checkpoint_step": int(step),
              "tokenizer_workdir": os.path.abspath(workdir)}, condition_shape=grid)
  if writer.complete:
    console(f"token store in {folder} is already complete ({writer.num_done} examples)")
    return folder
  done = writer.num_done
  if done:
    console(f"resuming token extraction after {done} stored examples")
  total = t.max_examples or None
  with progress_bar(total, f"tokenize {t.split}") as bar:
    bar.update(done)
    for batch in eval_batches(config, split=t.split, batch_size=t.batch_size,
                              max_examples=t.max_examples, skip=done):
      images = partitioning.shard_batch({"x": batch["image"]}, s.mesh)["x"]
      indices = multihost_utils.process_allgather(encode(variables, images), tiled=True)
      n = int(batch["mask"].sum())
      maps = (downsample_nearest(np.asarray(batch["label_map"][:n]), grid)
              if grid is not None else None)
      writer.add(indices[:n], batch["label"][:n], maps)
      bar.update(n)
  writer.finish()
  console(f"wrote {writer.num_done} token maps of shape {tuple(shape)} to {folder}")
  return folder
