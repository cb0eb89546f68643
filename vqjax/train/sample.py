"""--mode=sample for transformer configs: N images from the latest transformer and tokenizer.

Labels cycle through the classes (or none, unconditional). MaskGIT decodes
with `vqjax.sampling.maskgit.decode`, the GPT with the KV-cache sampler; the
tokenizer named by `config.tokenizer` turns tokens into images. Writes
`workdir/samples/samples_<step>.png` (a grid) and `.npz` (uint8 images,
tokens, labels), the latter ready for `python -m vqjax.eval.fid`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def _require_checkpoints(workdir: str, what: str) -> None:
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder) or not any(name.isdigit() for name in os.listdir(folder)):
    raise FileNotFoundError(f"no {what} checkpoint in {folder}: train it first, or point the "
                            "config at its run directory")


def _restore_latest(workdir: str, template, what: str):
  _require_checkpoints(workdir, what)
  manager = checkpoint.make_manager(workdir, 1, async_save=False)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {what} checkpoint in {os.path.join(workdir, 'checkpoints')}: "
                            "train it first")
  state, _ = checkpoint.restore(manager, step, template, with_data=False)
  manager.close()
  return state, step


def restore_tokenizer(config):
  """The tokenizer named in `config.tokenizer`, restored: (setup, its config, variables)."""
  from vqjax.train import run

  if not config.tokenizer.config or not config.tokenizer.workdir:
    raise ConfigError("set config.tokenizer.config (the tokenizer recipe) and "
                      "config.tokenizer.workdir (its run directory) to decode tokens")
  _require_checkpoints(config.tokenizer.workdir, "tokenizer")  # before building anything
  tok_config = load_config_file(config.tokenizer.config).copy_and_resolve_references()
  with tok_config.unlocked():
    tok_config.eval.fid = False
  tok = run.setup(tok_config)
  tok_state, _ = _restore_latest(config.tokenizer.workdir, tok.state, "tokenizer")
  variables = {"params": tok_state.params,
               **({"vq_stats": tok_state.vq_stats} if tok_state.vq_stats else {})}
  return tok, tok_config, variables


@dataclass
class Restored:
  """A trained transformer (latest checkpoint) with the tokenizer that decodes its tokens."""
  setup: transformer.Setup
  state: transformer.TransformerState  # boxed params, placed by the setup's shardings
  step: int
  tok: object  # the tokenizer's run.Setup
  tok_config: object
  variables: dict  # the tokenizer's restored variables

  @property
  def params(self):
    return nn.unbox(self.state.params)


def restore_models(config, workdir: str) -> Restored:
  """The latest transformer in `workdir` and the tokenizer named in `config.tokenizer`."""
  tok, tok_config, variables = restore_tokenizer(config)
  s = transformer.setup(config)
  state, step = _restore_latest(workdir, s.state, "transformer")
  return Restored(s, state, step, tok, tok_config, variables)


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


class ImageSampler:
  """Class-cycling batches of samples decoded to images; jitted once per batch shape."""

  def __init__(self, model, config, store, tok, variables):
    self.config, self.store, self.variables = config, store, variables
    h, w = store.token_shape[:2]
    flat_shape = (h * w,) + tuple(store.token_shape[2:])
    self._draw = jax.jit(lambda p, labels, r: sample_tokens(model, p, config, labels, flat_shape,
                                                            r))
    self._decode = jax.jit(lambda v, t: jnp.clip(
        tok.models.vqgan.apply(v, t, method=VQGAN.decode_indices), -1, 1))

  def batches(self, params, num: int, batch_size: int, seed: int):
    """Yields (images [B,H,W,3] in [-1,1], tokens [B,h,w(,c)], labels [B], valid) until `num`
    images; every batch is full and the first `valid` rows count (the last batch's extras
    are surplus). Labels cycle 0..num_classes-1 (0s if unconditional)."""
    classes = max(self.config.model.num_classes, 1)
    for i, start in enumerate(range(0, num, batch_size)):
      labels = (jnp.arange(start, start + batch_size) % classes).astype(jnp.int32)
      t = self._draw(params, labels, jax.random.fold_in(jax.random.PRNGKey(seed), i))
      t = t.reshape((batch_size,) + tuple(self.store.token_shape))
      images = np.asarray(jax.device_get(self._decode(self.variables, t)))
      yield images, np.asarray(t), np.asarray(labels), min(batch_size, num - start)


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(images) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def square_grid(uint8: np.ndarray) -> np.ndarray:
  """[n, s, s, 3] -> one ceil(sqrt n) x ceil(sqrt n) grid, blank tiles at the end."""
  n, side = uint8.shape[0], uint8.shape[1]
  cols = int(np.ceil(np.sqrt(n)))
  tiles = np.concatenate([uint8, np.zeros((cols * cols - n,) + uint8.shape[1:], np.uint8)])
  return tiles.reshape(cols, cols, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(
      cols * side, cols * side, 3)


def sample(config, workdir: str) -> str:
  """Write the samples; returns the .npz path."""
  m = restore_models(config, workdir)
  step = m.step
  sampler = ImageSampler(m.setup.model, config, m.setup.store, m.tok, m.variables)
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
  print(f"wrote {n} samples to {path} and samples_{step}.png", flush=True)
  return path
