"""Pieces every trainer's loop shares: stop signals, progress, non-finite guard, images."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image


class StopRequest:
  """Set by SIGTERM/SIGINT (or a caller); the loop saves a checkpoint and returns."""

  def __init__(self, event: threading.Event | None = None):
    self.event = event or threading.Event()
    self._previous = {}

  def install(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.event.set()

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def __bool__(self) -> bool:
    return self.event.is_set()


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had NaN/inf losses or gradients."""


class NonFiniteGuard:
  """Counts steps whose update was skipped for NaN/inf and stops after `limit` in a row."""

  def __init__(self, limit: int):
    self.limit = limit
    self.consecutive = 0
    self.total = 0
    self.last_finite: dict | None = None
    self.last_finite_step = -1

  def update(self, step: int, metrics: dict) -> None:
    if metrics.get("nonfinite", 0.0) > 0:
      self.consecutive += 1
      self.total += 1
      logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                      step, self.consecutive)
      if self.consecutive >= self.limit:
        raise NonFiniteLossError(
            f"{self.consecutive} consecutive non-finite steps ending at step {step}; updates "
            f"were skipped and no NaN was saved. Last finite values (step "
            f"{self.last_finite_step}): {self.last_finite}. Lower the learning rate or check "
            "the data, then resume from the last checkpoint.")
    else:
      self.consecutive = 0
      self.last_finite = {k: round(float(v), 6) for k, v in metrics.items()
                          if k.startswith("loss/")}
      self.last_finite_step = step


class ProgressLine:
  """Console line: step, loss, steps/s and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step = start_step
    self.last_time = time.time()

  def __call__(self, step: int, loss: float) -> str:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    line = (f"step {step}/{self.total} | loss {loss:.4f} | {rate:.2f} steps/s | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    print(line, flush=True)
    return line


def image_grid(columns: list[np.ndarray], max_rows: int = 8) -> np.ndarray:
  """Side-by-side columns of [B, H, W, 3] images in [-1, 1] -> uint8 [rows*H, cols*W, 3]."""
  rows = min(max_rows, columns[0].shape[0])
  tiles = [np.concatenate([np.asarray(col[r]) for col in columns], axis=1) for r in range(rows)]
  grid = np.concatenate(tiles, axis=0)
  return np.clip((grid + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def write_images(writer, workdir: str, step: int, name: str, grid: np.ndarray) -> str:
  """TensorBoard image and `workdir/images/<name>_<step>.png`."""
  writer.write_images(step, {name: grid[None]})
  folder = os.path.join(workdir, "images")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}_{step:07d}.png")
  Image.fromarray(grid).save(path)
  return path


def make_writer(workdir: str, is_main_process: bool):
  return metric_writers.create_default_writer(workdir, just_logging=not is_main_process)


def write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
