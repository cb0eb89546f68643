"""--mode=sample for transformer configs: N images from the latest transformer and tokenizer.

Labels cycle through the classes (or none, unconditional). The objective's
sampler draws the tokens (MaskGIT's iterative decoding, the GPT's KV-cache
sampler; `vqjax.objectives`); the tokenizer named by `config.tokenizer`
turns them into images. Writes `workdir/samples/samples_<step>.png` (a grid)
and `.npz` (uint8 images, tokens, labels), the latter ready for
`python -m vqjax.eval.fid`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vqjax.console import console
from vqjax.ops.images import square_grid, to_uint8
from vqjax.train import transformer
from vqjax.train.generate import ImageSampler


def sample(config, workdir: str) -> str:
  """Write the samples; returns the .npz path."""
  m = transformer.restore_models(config, workdir)
  step = m.step
  sampler = ImageSampler(m.setup.objective, config.sample, m.tok, m.variables)
  n = config.sample.num_images
  parts = [[x[:valid] for x in arrays] for *arrays, valid in
           sampler.batches(m.params, n, config.sample.batch_size, config.seed)]
  uint8 = to_uint8(np.concatenate([p[0] for p in parts]))
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(square_grid(uint8)).save(os.path.join(folder, f"samples_{step}.png"))
  path = os.path.join(folder, f"samples_{step}.npz")
  np.savez(path, images=uint8, tokens=np.concatenate([p[1] for p in parts]),
           labels=np.concatenate([p[2] for p in parts]))
  console(f"wrote {n} samples to {path} and samples_{step}.png")
  return path
