"""Throughput of the jitted tokenizer train step; prints one JSON line.

  python benchmarks/tokenizer_step.py --config=configs/vqgan_imagenet.py:smoke --batch_size=8
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/vqgan_imagenet.py:smoke", "recipe[:variant]")
_BATCH = flags.DEFINE_integer("batch_size", 8, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps after warm-up")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps (compilation) before timing")
_GAN = flags.DEFINE_bool("gan", True, "time the step with the discriminator active")


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv):
  del argv
  import jax
  import numpy as np

  from vqjax.core import partitioning
  from vqjax.train.run import setup

  config = load_config(_CONFIG.value)
  with config.unlocked():
    config.train.batch_size = _BATCH.value
    config.eval.batch_size = _BATCH.value
    config.loss.disc_start = 0 if _GAN.value else 10**9
  s = setup(config)
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (_BATCH.value, size, size, 3)).astype(np.float32),
           "label": np.zeros((_BATCH.value,), np.int32)}
  device_batch = partitioning.shard_batch(batch, s.mesh)
  state = s.state
  start = time.perf_counter()
  for _ in range(_WARMUP.value):
    state, metrics = s.train_step(state, device_batch, s.term_params)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = s.train_step(state, device_batch, s.term_params)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  ms = 1000 * elapsed / _STEPS.value
  print(json.dumps({
      "benchmark": "tokenizer_step", "config": _CONFIG.value, "batch_size": _BATCH.value,
      "image_size": size, "gan_active": _GAN.value, "ms_per_step": round(ms, 2),
      "images_per_s": round(_BATCH.value * 1000 / ms, 2), "warmup_s": round(compile_s, 2),
      "devices": jax.device_count(), "platform": jax.devices()[0].platform,
  }))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
