"""--mode=sample for transformer configs: N images from the latest transformer and tokenizer.

Labels cycle through the classes (or none, unconditional). A model conditioned
on semantic maps (model.condition = 'semantic_map', Reg-VQ's semantic image
synthesis) samples under the label maps of the tokenizer's validation images,
in order. The objective's sampler draws the tokens (MaskGIT's iterative
decoding, the GPT's KV-cache sampler; `vqjax.objectives`); the tokenizer
named by `config.tokenizer` turns them into images. Writes
`workdir/samples/samples_<step>.png` (a grid; under semantic maps one
[map | real | sample] row per image) and `.npz` (uint8 images, tokens,
labels, and under semantic maps the condition ids), the latter ready for
`python -m vqjax.eval.fid`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vqjax.console import console
from vqjax.core.writers import image_grid
from vqjax.ops.images import square_grid, to_uint8
from vqjax.train import transformer
from vqjax.train.generate import ImageSampler, sample_conditions


def _recording(iterator, seen: list):
  """`iterator`, keeping each item it yields in `seen`."""
  for item in iterator:
    seen.append(item)
    yield item


def map_grid(label_maps, real, samples, classes: int) -> np.ndarray:
  """uint8 rows of [coloured label map | real image | sample] (images in [-1, 1])."""
  from vqjax.data.label_maps import colorize

  maps = colorize(np.asarray(label_maps), classes).astype(np.float32) / 127.5 - 1.0
  return image_grid([maps, np.asarray(real), np.asarray(samples)], max_rows=len(samples))


def sample(config, workdir: str) -> str:
  """Write the samples; returns the .npz path."""
  m = transformer.restore_models(config, workdir)
  step = m.step
  objective, bs = m.setup.objective, config.sample.batch_size
  sampler = ImageSampler(objective, config.sample, m.tok, m.variables)
  n = config.sample.num_images
  conditions = sample_conditions(objective, m.setup.store, m.tok_config, bs)
  given: list = []
  if conditions is not None:
    conditions = _recording(conditions, given)
  parts = [[x[:valid] for x in arrays] for *arrays, valid in
           sampler.batches(m.params, n, bs, config.seed, conditions)]
  images = np.concatenate([p[0] for p in parts])
  uint8 = to_uint8(images)
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  extra = {}
  if given:
    pick = lambda key: np.concatenate([np.asarray(b[key]) for b in given])[:n]
    grid = map_grid(pick("label_map"), pick("image"), images, objective.conditions.vocab)
    extra["conditions"] = np.asarray(pick("cond"))
  else:
    grid = square_grid(uint8)
  Image.fromarray(grid).save(os.path.join(folder, f"samples_{step}.png"))
  path = os.path.join(folder, f"samples_{step}.npz")
  np.savez(path, images=uint8, tokens=np.concatenate([p[1] for p in parts]),
           labels=np.concatenate([p[2] for p in parts]), **extra)
  console(f"wrote {n} samples to {path} and samples_{step}.png")
  return path
