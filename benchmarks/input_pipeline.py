"""Training input pipeline throughput (decoded, augmented images/s) against the train step's.

  python benchmarks/input_pipeline.py                         # 0, 2 and 4 workers
  python benchmarks/input_pipeline.py --workers=0,8 --images=1000 --batch_size=64 \
      --step_config=configs/vqgan_imagenet.py:smoke

Writes `--images` generated JPEGs (smooth random images with a little noise, so they
compress like photographs; shorter side `--side`, aspect ratios 1 to 1.5) into a
temporary folder, then for each `--workers` count times `train_dataset` over it with
the ImageNet tokenizer's preprocessing (resize the shorter side to 256, random 256px crop,
random flip, scale to [-1, 1]): after a warm-up (the first batch, which includes starting
the workers, plus as many batches as the prefetch buffers can hold, so that the timed
batches are produced, not drained from buffers), `--measure_batches` batches. One JSON
line per worker count, then one for the tokenizer train step of `--step_config` (the
step `vqjax.train.run.setup` builds, on random images at the config's own size; timed
with benchmarks/mfu.py's `time_calls`), so the two rates can be compared: the pipeline
keeps up when its images/s exceed the step's (at the same image size).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import mfu  # noqa: E402  (helpers; its flags come along, unused here)

_IMAGES = flags.DEFINE_integer("images", 300, "generated JPEG files")
_SIDE = flags.DEFINE_integer("side", 256, "shorter side of the generated images")
_BATCH = flags.DEFINE_integer("batch_size", 32, "pipeline batch size")
_WORKERS = flags.DEFINE_list("workers", ["0", "2", "4"], "config.data.workers values to time")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "config.data.prefetch")
_MEASURE = flags.DEFINE_integer("measure_batches", 30, "timed batches per worker count")
_STEP_CONFIG = flags.DEFINE_string("step_config", "configs/demo.py",
                                   "recipe[:variant] whose tokenizer train step is timed "
                                   "('' to skip)")
_STEP_BATCH = flags.DEFINE_integer("step_batch", 0, "train step batch (0: the config's own)")
_STEP_ITERS = flags.DEFINE_integer("step_iters", 5, "timed train steps after two untimed ones")


def write_images(folder: str, count: int, side: int) -> int:
  """`count` smooth random JPEGs in two class folders; returns their total bytes."""
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(0)
  total = 0
  for i in range(count):
    sub = os.path.join(folder, f"class{i % 2}")
    os.makedirs(sub, exist_ok=True)
    long = int(side * rng.uniform(1.0, 1.5))
    h, w = (side, long) if i % 2 else (long, side)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    path = os.path.join(sub, f"im{i:05d}.jpg")
    Image.fromarray(pixels).save(path, quality=90)
    total += os.path.getsize(path)
  return total


def cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live children so far (None without
  psutil): CPU per image does not depend on what else the machine runs."""
  try:
    import psutil
  except ImportError:
    return None
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    with contextlib.suppress(psutil.Error):
      total += sum(child.cpu_times()[:2])
  return total


def pipeline_config(folder: str, workers: int):
  from vqjax import config_lib

  c = config_lib.tokenizer_config()  # data: 256px crops of the shorter side resized to 256
  c.data.source = "folder"
  c.data.folder = folder
  c.data.workers = workers
  c.data.prefetch = _PREFETCH.value
  c.train.batch_size = _BATCH.value
  return c


def time_pipeline(folder: str, workers: int) -> dict:
  from vqjax.data.pipeline import train_dataset

  ds, preprocess = train_dataset(pipeline_config(folder, workers))
  start = time.perf_counter()
  it = iter(ds)
  batch = next(it)
  first = time.perf_counter() - start
  # What the buffers can hold when the first batch arrives: each worker's queue and the
  # main process's read-ahead of it (Grain's interleave), one chunk in hand per worker.
  for _ in range(workers * (2 * _PREFETCH.value + 1) + 2):
    next(it)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(_MEASURE.value):
    batch = next(it)
  seconds = time.perf_counter() - start
  images = _MEASURE.value * _BATCH.value
  cpu_ms = None if cpu is None else round(1000 * (cpu_seconds() - cpu) / images, 2)
  close = getattr(it, "close", None)
  if close is not None:
    close()
  return {"workers": workers, "prefetch": _PREFETCH.value if workers else None,
          "batch_size": _BATCH.value, "image_size": int(batch["image"].shape[1]),
          "images_per_s": round(images / seconds, 1), "cpu_ms_per_image": cpu_ms,
          "first_batch_s": round(first, 2), "corrupt": preprocess.num_corrupt}


def time_train_step(spec: str) -> dict:
  import jax
  import numpy as np

  from vqjax.core import partitioning
  from vqjax.train.run import setup

  config = mfu.load_config(spec)
  b = _STEP_BATCH.value or config.train.batch_size
  with config.unlocked():
    config.train.batch_size = b
    config.eval.batch_size = b
    config.eval.fid = False  # not part of the step; spares loading Inception
  s = setup(config)
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = partitioning.shard_batch(
      {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
       "label": np.zeros((b,), np.int32)}, s.mesh)
  box = {"state": s.state}

  def call():
    box["state"], metrics = s.train_step(box["state"], batch, s.term_params)
    return metrics

  seconds = mfu.time_calls(call, _STEP_ITERS.value)
  return {"config": spec, "batch_size": b, "image_size": size,
          "gan_active": config.loss.disc_start <= 0,
          "images_per_s": round(b / seconds, 1), "ms_per_step": round(1000 * seconds, 1),
          "platform": jax.devices()[0].platform, "devices": jax.device_count()}


def main(argv):
  del argv
  common = {"benchmark": "input_pipeline", "cpus": os.cpu_count()}
  with tempfile.TemporaryDirectory(prefix="vqjax-input-pipeline-") as folder:
    nbytes = write_images(folder, _IMAGES.value, _SIDE.value)
    files = {"files": _IMAGES.value, "side": _SIDE.value,
             "mean_file_kb": round(nbytes / _IMAGES.value / 1024, 1)}
    for workers in (int(w) for w in _WORKERS.value):
      r = time_pipeline(folder, workers)
      print(json.dumps({**common, "case": "pipeline", **r, **files,
                        "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
  if _STEP_CONFIG.value:
    r = time_train_step(_STEP_CONFIG.value)
    print(json.dumps({**common, "case": "train_step", **r,
                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
  app.run(main)
