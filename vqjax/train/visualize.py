"""--mode=visualize for causal objectives: SeQ-GAN's teacher-forced visualisation (Sec. 3.2).

Validation images are tokenized by the configured tokenizer; a model whose
objective has the `teacher_forcing` capability (the GPT) reads the true
tokens and its top-1 prediction at every position is decoded like the true
tokens. Writes `visualize/visualize_<step>.png`
([input | reconstruction | AR top-1] rows) and `.json` with the top-1 token
accuracy.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqjax import registry
from vqjax.console import console
from vqjax.core.writers import image_grid, write_json
from vqjax.data.pipeline import eval_batches
from vqjax.errors import ConfigError
from vqjax.sampling.visualize import teacher_forced_top1
from vqjax.train import transformer
from vqjax.train.generate import batch_conditions, decode_tokens


def visualize(config, workdir: str, num_images: int = 8) -> dict:
  """Grid and accuracy for `num_images` validation images; returns the JSON payload."""
  name = config.model.objective.name
  if not registry.OBJECTIVES.get(name).teacher_forcing:
    able = [n for n in registry.OBJECTIVES.names() if registry.OBJECTIVES.get(n).teacher_forcing]
    raise ConfigError(f"--mode=visualize needs teacher forcing, which model.objective.name="
                      f"{name!r} does not have (one of {able} does): it predicts each token "
                      "from the true tokens before it")
  m = transformer.restore_models(config, workdir)
  objective, params, step, store = m.setup.objective, m.params, m.step, m.setup.store
  tok, tok_config, variables = m.tok, m.tok_config, m.variables
  batch = next(eval_batches(tok_config, batch_size=num_images, max_examples=num_images))
  n = int(batch["mask"].sum())
  images = batch["image"][:n]
  tokens = tok.models.vqgan.apply(variables, images, method="encode").indices
  if tokens.shape[1:] != store.token_shape:
    raise ConfigError(f"the tokenizer gives tokens {tokens.shape[1:]}, the GPT was trained on "
                      f"{store.token_shape}: use the tokenizer that made config.tokens.dir")
  flat = objective.flatten(tokens)
  cond = batch_conditions(objective, batch, store.condition_shape, n)
  pred, acc = teacher_forced_top1(lambda t, c: objective.logits(params, t, c), flat, cond)
  decode = lambda t: np.asarray(decode_tokens(tok, variables, objective.unflatten(t)))
  grid = image_grid([images, decode(flat), decode(pred)], max_rows=n)
  folder = os.path.join(workdir, "visualize")
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(grid).save(os.path.join(folder, f"visualize_{step}.png"))
  payload = {"step": int(step), "top1_accuracy": float(jnp.mean(acc)),
             "per_image_accuracy": [round(float(a), 4) for a in acc], "num_images": n}
  write_json(os.path.join(folder, f"visualize_{step}.json"), payload)
  console(f"teacher-forced top-1 accuracy {payload['top1_accuracy']:.4f} over {n} images; grid "
        f"in {folder}/visualize_{step}.png")
  return payload
