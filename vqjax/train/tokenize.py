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
from vqjax.data.pipeline import positioned_batches
from vqjax.data.tokens import TokenStoreError, TokenStoreWriter
from vqjax.eval.inception_features import data_description, progress_bar
from vqjax.nn.vqgan import VQGAN
from vqjax.train.tokenizer import tokenizer_variables


def token_dir(config, workdir: str) -> str:
  return config.tokenize.output_dir or os.path.join(workdir, f"tokens_{config.tokenize.split}")


def tokenize(config, workdir: str) -> str:
  """Write the token store for `config.tokenize.split`; returns its folder.

  With several processes each encodes its rows of every global batch
  (`vqjax.data.pipeline.positioned_batches`); the indices, labels, condition maps and
  source positions are gathered and process 0 writes them, in source order, so the
  store is the same for any process count. The store records, per shard, the position
  after its last example: a resumed run, with any number of processes, starts there
  (process 0 reads it and tells the others).
  """
  from vqjax.train.run import restore_for_eval, setup

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.fid = False  # not needed here; skips loading the Inception weights
  s = setup(config)
  state, step = restore_for_eval(config, workdir, s)
  t = config.tokenize
  partitioning.check_batch_split(config, len(s.mesh.devices.flat), jax.process_count(),
                                 ("tokenize.batch_size",))
  variables = tokenizer_variables(state)
  batch_sh = partitioning.batch_sharding(s.mesh)
  encode = jax.jit(lambda v, x: s.models.vqgan.apply(v, x, method=VQGAN.encode).indices,
                   out_shardings=batch_sh)
  size = config.data.image_size
  shape = jax.eval_shape(encode, variables, jnp.zeros((t.batch_size, size, size, 3))).shape[1:]
  folder = token_dir(config, workdir)
  grid = tuple(shape[:2]) if config.data.label_maps else None  # condition maps: token grid
  main = jax.process_index() == 0
  writer = None
  resume = np.zeros(3, np.int64)  # complete, start position, examples stored
  if main:
    writer = TokenStoreWriter(
        folder, shape, config.model.quantizer.codebook_size, t.shard_size,
        source={"data": data_description(config, t.split), "checkpoint_step": int(step),
                "tokenizer_workdir": os.path.abspath(workdir)}, condition_shape=grid)
    start = writer.next_position
    if start is None and not writer.complete:
      raise TokenStoreError(
          f"the partial token store in {folder} was written by an older vqjax, without the "
          "source positions a resumed extraction needs: delete it and run --mode=tokenize "
          "again")
    resume[:] = (writer.complete, start or 0, writer.num_done)
  if jax.process_count() > 1:
    resume = np.asarray(multihost_utils.broadcast_one_to_all(resume))
  complete, start, done = (int(v) for v in resume)
  if complete:
    console(f"token store in {folder} is already complete ({done} examples)")
    return folder
  if done:
    console(f"resuming token extraction after {done} stored examples (source position "
          f"{start})")
  end = t.max_examples or np.iinfo(np.int64).max
  with progress_bar(t.max_examples or None, f"tokenize {t.split}") as bar:
    bar.update(start)
    seen = start
    for batch in positioned_batches(config, t.split, start, end, t.batch_size,
                                    jax.process_index(), jax.process_count()):
      images = partitioning.shard_batch({"x": batch["image"]}, s.mesh)["x"]
      local = {"indices": partitioning.local_rows(encode(variables, images)),
               "label": batch["label"], "mask": batch["mask"], "position": batch["position"]}
      if grid is not None:
        local["condition"] = downsample_nearest(np.asarray(batch["label_map"]), grid)
      rows = local if jax.process_count() == 1 else multihost_utils.process_allgather(
          local, tiled=True)
      real = np.asarray(rows["mask"]) > 0
      if main and real.any():
        writer.add(np.asarray(rows["indices"])[real], np.asarray(rows["label"])[real],
                   np.asarray(rows["condition"])[real] if grid is not None else None,
                   np.asarray(rows["position"])[real])
      reached = max(seen, int(np.asarray(rows["position"]).max()) + 1)
      bar.update(reached - seen)
      seen = reached
  if main:
    writer.finish()
    console(f"wrote {writer.num_done} token maps of shape {tuple(shape)} to {folder}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vqjax tokenize finished")
  return folder

