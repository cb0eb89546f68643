"""--mode=sample for transformer configs: N images from the latest transformer and tokenizer.

Labels cycle through the classes (or none, unconditional). MaskGIT decodes
with `vqjax.sampling.maskgit.decode`, the GPT with the KV-cache sampler; the
tokenizer named by `config.tokenizer` turns tokens into images. Writes
`workdir/samples/samples_<step>.png` (a grid) and `.npz` (uint8 images,
tokens, labels), the latter ready for `python -m vqjax.eval.fid`.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqjax.config_lib import ConfigError, load_config_file
from vqjax.nn.transformers import GPT
from vqjax.nn.vqgan import VQGAN
from vqjax.sampling import autoregressive as ar
from vqjax.sampling import maskgit
from vqjax.train import checkpoint, transformer


def _restore_latest(workdir: str, template, what: str):
  manager = checkpoint.make_manager(workdir, 1, async_save=False)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {what} checkpoint in {os.path.join(workdir, 'checkpoints')}: "
                            "train it first")
  state, _ = checkpoint.restore(manager, step, template, with_data=False)
  manager.close()
  return state, step


def restore_models(config, workdir: str):
  """The latest transformer and the tokenizer named in `config.tokenizer`, both restored.

  Returns (model, params, step, store, tokenizer setup, tokenizer config, tokenizer variables).
  """
  from vqjax.train import run

  if not config.tokenizer.config or not config.tokenizer.workdir:
    raise ConfigError("set config.tokenizer.config (the tokenizer recipe) and "
                      "config.tokenizer.workdir (its run directory) to decode tokens")
  model, _, _, state, _, _, store = transformer.setup(config)
  state, step = _restore_latest(workdir, state, "transformer")
  tok_config = load_config_file(config.tokenizer.config).copy_and_resolve_references()
  with tok_config.unlocked():
    tok_config.eval.fid = False
  tok = run.setup(tok_config)
  tok_state, _ = _restore_latest(config.tokenizer.workdir, tok.state, "tokenizer")
  variables = {"params": tok_state.params,
               **({"vq_stats": tok_state.vq_stats} if tok_state.vq_stats else {})}
  return model, nn.unbox(state.params), step, store, tok, tok_config, variables


def sample_tokens(model, params, config, labels, shape, rng):
  """[B, h*w(, c)] tokens for `labels` ([B] ints, ignored when unconditional)."""
  s, m = config.sample, config.model
  b = labels.shape[0]
  if m.kind == "maskgit":
    conditional = m.num_classes > 0
    null = jnp.full_like(labels, m.num_classes)

    def logits_fn(tokens):
      if not conditional:
        return model.apply({"params": params}, tokens, None)
      cond = model.apply({"params": params}, tokens, labels)
      if s.guidance_scale == 0:
        return cond
      return maskgit.guided_logits(cond, model.apply({"params": params}, tokens, null),
                                   s.guidance_scale)

    start = jnp.full((b,) + shape, model.mask_id, jnp.int32)
    return maskgit.decode(logits_fn, start, model.mask_id, rng, s.steps,
                          s.choice_temperature, s.temperature)[0]

  def decode_fn(ids, cache, index):
    return model.apply({"params": params}, ids, cache, index, method=GPT.decode)

  cond = labels if m.num_classes else jnp.zeros_like(labels)
  prefix = model.codebook_size + cond[:, None]
  guided = s.guidance_scale != 0 and m.num_classes > 0
  uncond = model.codebook_size + jnp.full_like(prefix, m.num_classes) if guided else None
  cache = model.init_cache(2 * b if guided else b)
  return ar.sample(decode_fn, cache, prefix, model.seq_len, rng, s.temperature, s.top_k,
                   s.top_p, uncond, s.guidance_scale)


def sample(config, workdir: str) -> str:
  """Write the samples; returns the .npz path."""
  model, params, step, store, tok, _, variables = restore_models(config, workdir)
  h, w = store.token_shape[:2]
  flat_shape = (h * w,) + store.token_shape[2:]
  draw = jax.jit(lambda p, labels, r: sample_tokens(model, p, config, labels, flat_shape, r))
  to_image = jax.jit(lambda v, t: tok.models.vqgan.apply(v, t, method=VQGAN.decode_indices))
  n, bs = config.sample.num_images, config.sample.batch_size
  classes = max(config.model.num_classes, 1)
  images, tokens, labels = [], [], []
  for i, start in enumerate(range(0, n, bs)):
    batch_labels = (jnp.arange(start, start + bs) % classes).astype(jnp.int32)
    t = draw(params, batch_labels, jax.random.fold_in(jax.random.PRNGKey(config.seed), i))
    t = t.reshape((bs,) + tuple(store.token_shape))
    x = jnp.clip(to_image(variables, t), -1, 1)
    images.append(np.asarray(jax.device_get(x)))
    tokens.append(np.asarray(t))
    labels.append(np.asarray(batch_labels))
  images = np.concatenate(images)[:n]
  uint8 = np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  cols = int(np.ceil(np.sqrt(n)))
  pad = cols * cols - n
  tiles = np.concatenate([uint8, np.zeros((pad,) + uint8.shape[1:], np.uint8)])
  side = uint8.shape[1]
  grid = tiles.reshape(cols, cols, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(
      cols * side, cols * side, 3)
  Image.fromarray(grid).save(os.path.join(folder, f"samples_{step}.png"))
  path = os.path.join(folder, f"samples_{step}.npz")
  np.savez(path, images=uint8, tokens=np.concatenate(tokens)[:n],
           labels=np.concatenate(labels)[:n])
  print(f"wrote {n} samples to {path} and samples_{step}.png", flush=True)
  return path
