"""--mode=visualize for GPT configs: SeQ-GAN's teacher-forced visualisation (Sec. 3.2).

Validation images are tokenized by the configured tokenizer; the GPT reads
the true tokens (teacher forcing) and its top-1 prediction at every position
is decoded like the true tokens. Writes `visualize/visualize_<step>.png`
([input | reconstruction | AR top-1] rows) and `.json` with the top-1 token
accuracy.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqjax.config_lib import ConfigError
from vqjax.data.pipeline import eval_batches
from vqjax.nn.vqgan import VQGAN
from vqjax.sampling.visualize import teacher_forced_top1
from vqjax.train.loop import image_grid, write_json
from vqjax.train.sample import restore_models


def visualize(config, workdir: str, num_images: int = 8) -> dict:
  """Grid and accuracy for `num_images` validation images; returns the JSON payload."""
  if config.model.kind != "gpt":
    raise ConfigError("--mode=visualize needs a causal model (model.kind='gpt'): teacher "
                      "forcing predicts each token from the true tokens before it")
  m = restore_models(config, workdir)
  model, params, step, store = m.setup.model, m.params, m.step, m.setup.store
  tok, tok_config, variables = m.tok, m.tok_config, m.variables
  batch = next(eval_batches(tok_config, batch_size=num_images, max_examples=num_images))
  n = int(batch["mask"].sum())
  images = batch["image"][:n]
  tokens = tok.models.vqgan.apply(variables, images, method=VQGAN.encode).indices
  if tokens.shape[1:] != store.token_shape:
    raise ConfigError(f"the tokenizer gives tokens {tokens.shape[1:]}, the GPT was trained on "
                      f"{store.token_shape}: use the tokenizer that made config.tokens.dir")
  flat = tokens.reshape(n, -1)
  cond = jnp.asarray(batch["label"][:n]) if config.model.num_classes else jnp.zeros(n, jnp.int32)
  pred, acc = teacher_forced_top1(lambda t, c: model.apply({"params": params}, t, c), flat, cond)
  decode = lambda t: np.asarray(jnp.clip(tok.models.vqgan.apply(
      variables, t.reshape(tokens.shape), method=VQGAN.decode_indices), -1, 1))
  grid = image_grid([images, decode(flat), decode(pred)], max_rows=n)
  folder = os.path.join(workdir, "visualize")
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(grid).save(os.path.join(folder, f"visualize_{step}.png"))
  payload = {"step": int(step), "top1_accuracy": float(jnp.mean(acc)),
             "per_image_accuracy": [round(float(a), 4) for a in acc], "num_images": n}
  write_json(os.path.join(folder, f"visualize_{step}.json"), payload)
  print(f"teacher-forced top-1 accuracy {payload['top1_accuracy']:.4f} over {n} images; grid "
        f"in {folder}/visualize_{step}.png", flush=True)
  return payload
