"""The `torch.save` state dict reader on hand-written files of both formats (no torch needed)."""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from tests.torch_files import MAGIC, View, write_torch_state_dict
from vqjax.errors import WeightsNotFoundError
from vqjax.weights.numpy_pickle import UnsafePickleError
from vqjax.weights.torch_state_dict import (
  TorchFileError,
  load_torch_state_dict,
  torch_state_dict_layout,
)

FORMATS = ["zip", "legacy"]


def _tensors() -> dict:
  rng = np.random.default_rng(0)
  shared = np.arange(24, dtype=np.float32) * 0.5  # one storage under the three views
  return {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f64": rng.standard_normal(5),
      "f16": rng.standard_normal((2, 3)).astype(np.float16),
      "i64": np.arange(-6, 6, dtype=np.int64).reshape(3, 2, 2),
      "i32": np.array([1 << 30, -5], np.int32),
      "i16": np.array([-300], np.int16),
      "i8": np.array([-128, 127], np.int8),
      "u8": np.array([0, 200, 255], np.uint8),
      "bool": np.array([[True, False], [False, True]]),
      "scalar": np.array(-1.5, np.float32),
      "scalar_int": np.array(7, np.int64),
      "empty": np.zeros((0, 3), np.float32),
      "transposed": View(shared, 0, (6, 4), (1, 6)),  # non-contiguous
      "window": View(shared, 2, (2, 3), (3, 1)),  # same storage, other offsets
      "every_other": View(shared, 15, (4,), (2,)),
  }


def _expected(value) -> np.ndarray:
  return value.expected() if isinstance(value, View) else value


def _write(tmp_path, tensors: dict, fmt: str, **options) -> str:
  path = str(tmp_path / f"weights_{fmt}.pt")
  write_torch_state_dict(path, tensors, fmt, **options)
  return path


@pytest.mark.parametrize("fmt,options", [("zip", {}), ("legacy", {}), ("legacy", {"rebuild": "v1"}),
                                         ("legacy", {"legacy_views": True})])
def test_round_trip(tmp_path, fmt, options):
  torch_was_loaded = "torch" in sys.modules
  tensors = _tensors()
  path = _write(tmp_path, tensors, fmt, **options)
  loaded, layout = load_torch_state_dict(path), torch_state_dict_layout(path)
  assert list(loaded) == list(tensors) and list(layout) == list(tensors)
  for name, value in tensors.items():
    want, got = _expected(value), loaded[name]
    assert isinstance(got, np.ndarray) and got.dtype.isnative, name
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert layout[name] == (want.dtype.name, want.shape), name
  # Tensors that share a storage in the file come back as independent arrays.
  loaded["window"][...] = 0
  np.testing.assert_array_equal(loaded["transposed"], tensors["transposed"].expected())
  assert torch_was_loaded or "torch" not in sys.modules


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_dicts_other_values_and_bfloat16(tmp_path, fmt):
  # bfloat16 keeps float32's upper 16 bits: 1 + 2**-10 needs more mantissa, so it rounds down.
  bf = np.array([1.0, -0.15625, 3.0e10, 1 + 2**-10], np.float32)
  inner = {"conv.weight": np.ones((2, 1, 3, 3), np.float32), "conv.bias": np.zeros(2, np.float32)}
  path = _write(tmp_path, {"state_dict": inner, "bf": bf, "epoch": 3, "arch": "vgg"}, fmt,
                bfloat16=("bf",))
  loaded = load_torch_state_dict(path)
  assert loaded["epoch"] == 3 and loaded["arch"] == "vgg"
  assert type(loaded["state_dict"]) is dict and list(loaded["state_dict"]) == list(inner)
  np.testing.assert_array_equal(loaded["state_dict"]["conv.weight"], inner["conv.weight"])
  assert loaded["bf"].dtype == np.float32
  np.testing.assert_array_equal(loaded["bf"], [1.0, -0.15625, (bf[2:3].view(np.uint32) >> 16 << 16)
                                               .view(np.float32)[0], 1.0])
  assert torch_state_dict_layout(path) == {
      "state_dict": {"conv.weight": ("float32", (2, 1, 3, 3)), "conv.bias": ("float32", (2,))},
      "bf": ("float32", (4,))}  # not-tensor values are left out of the layout


def _drop_storage_bytes(path: str, fmt: str, tensors: dict) -> None:
  """Remove the storages' bytes from a file holding one storage per tensor."""
  if fmt == "legacy":  # they end the file: an int64 count, then the bytes, per storage
    data = open(path, "rb").read()
    cut = len(data) - sum(8 + value.nbytes for value in tensors.values())
    open(path, "wb").write(data[:cut])
    return
  with zipfile.ZipFile(path) as z:
    entries = {name: z.read(name) for name in z.namelist() if "/data/" not in name}
  with zipfile.ZipFile(path, "w") as z:
    for name, raw in entries.items():
      z.writestr(name, raw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layout_reads_no_storage_bytes(tmp_path, fmt):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
             "c": np.array(True)}
  path = _write(tmp_path, tensors, fmt)
  _drop_storage_bytes(path, fmt, tensors)
  assert torch_state_dict_layout(path) == {"a": ("float32", (2, 3)), "b": ("int64", (4,)),
                                           "c": ("bool", ())}
  with pytest.raises(TorchFileError, match=f"{path} .*storage .* is missing"):
    load_torch_state_dict(path)


def test_legacy_storage_cut_short(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32), "b": np.arange(100, dtype=np.int64)}
  path = _write(tmp_path, tensors, "legacy")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-5])
  assert torch_state_dict_layout(path)["b"] == ("int64", (100,))
  with pytest.raises(TorchFileError, match="runs past the end of the file"):
    load_torch_state_dict(path)


def test_zip_storage_shorter_than_declared(tmp_path):
  path = _write(tmp_path, {"a": np.arange(4, dtype=np.float32)}, "zip")
  with zipfile.ZipFile(path) as z:
    entries = {name: z.read(name) for name in z.namelist()}
  entries["archive/data/0"] = entries["archive/data/0"][:8]
  with zipfile.ZipFile(path, "w") as z:
    for name, raw in entries.items():
      z.writestr(name, raw)
  assert torch_state_dict_layout(path) == {"a": ("float32", (4,))}
  with pytest.raises(TorchFileError, match="storage 0 holds 8 bytes"):
    load_torch_state_dict(path)


def test_big_endian_zip(tmp_path):
  value = np.arange(5, dtype=np.float32) - 2.5
  path = _write(tmp_path, {"a": value}, "zip")
  with zipfile.ZipFile(path) as z:
    entries = {name: z.read(name) for name in z.namelist()}
  entries["archive/byteorder"] = b"big"
  entries["archive/data/0"] = value.astype(">f4").tobytes()
  with zipfile.ZipFile(path, "w") as z:
    for name, raw in entries.items():
      z.writestr(name, raw)
  got = load_torch_state_dict(path)["a"]
  assert got.dtype.isnative
  np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_past_its_storage_is_refused(tmp_path, fmt):
  path = _write(tmp_path, {"w": View(np.zeros(4, np.float32), 2, (3,), (1,))}, fmt)
  for read in (load_torch_state_dict, torch_state_dict_layout):
    with pytest.raises(TorchFileError, match="runs past its storage of 4 elements"):
      read(path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_globals_are_refused_before_anything_runs(tmp_path, fmt):
  marker = tmp_path / "pwned"
  path = _write(tmp_path, {"w": np.ones(2, np.float32), "evil": _Evil(marker)}, fmt)
  for read in (load_torch_state_dict, torch_state_dict_layout):
    with pytest.raises(UnsafePickleError, match=f"{path}: refusing to load posix.system"):
      read(path)
  assert not marker.exists()


def _legacy_stream(object_pickle: bytes, keys: list | None = None) -> bytes:
  sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
  return b"".join([pickle.dumps(MAGIC, protocol=2), pickle.dumps(1001, protocol=2),
                   pickle.dumps(sys_info, protocol=2), object_pickle,
                   pickle.dumps(keys or [], protocol=2)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_globals_are_refused_without_importing_their_module(tmp_path, fmt):
  # GLOBAL of a module that does not exist, then a call: importing would fail differently.
  evil = b"\x80\x02cvqjax_no_such_module\nrun\n)R."
  path = tmp_path / "evil.pt"
  if fmt == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", evil)
  else:
    path.write_bytes(_legacy_stream(evil))
  with pytest.raises(UnsafePickleError, match="refusing to load vqjax_no_such_module.run"):
    load_torch_state_dict(str(path))
  assert "vqjax_no_such_module" not in sys.modules


def test_missing_file(tmp_path):
  with pytest.raises(WeightsNotFoundError, match="not found: .*nope.pth"):
    load_torch_state_dict(str(tmp_path / "nope.pth"))
  with pytest.raises(FileNotFoundError):
    torch_state_dict_layout(str(tmp_path / "nope.pth"))


def _tar_bytes() -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    info = tarfile.TarInfo("pickle")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  return out.getvalue()


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"hello, not weights\n" * 40, "not a PyTorch torch.save file"),
    (pickle.dumps({"a": 1}), "not a PyTorch torch.save file"),
    (pickle.dumps(MAGIC, protocol=2) + pickle.dumps(999, protocol=2), "protocol version 999"),
    (_legacy_stream(pickle.dumps([1, 2], protocol=2)), "holds a list, not a state dict"),
    (_tar_bytes(), "tar archive"),
])
def test_not_a_torch_state_dict(tmp_path, content, message):
  path = tmp_path / "x.pth"
  path.write_bytes(content)
  for read in (load_torch_state_dict, torch_state_dict_layout):
    with pytest.raises(TorchFileError, match=message) as error:
      read(str(path))
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
  with pytest.raises(TorchFileError, match="not a file"):
    load_torch_state_dict(str(tmp_path))


def test_torchscript_archive_is_named(tmp_path):
  path = tmp_path / "scripted.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
  with pytest.raises(TorchFileError, match="TorchScript archive"):
    load_torch_state_dict(str(path))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_file(tmp_path, fmt, keep):
  path = _write(tmp_path, _tensors(), fmt)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * keep)])
  with pytest.raises(TorchFileError, match="truncated") as error:
    load_torch_state_dict(path)
  assert str(error.value).startswith(path) and "\n" not in str(error.value)
