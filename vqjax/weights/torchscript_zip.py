"""Read the tensors of a TorchScript zip archive into NumPy, executing nothing.

A TorchScript file (`torch.jit.save`) is a zip holding `<root>/data.pkl`, a
pickle of the module tree, and `<root>/data/<key>`, the raw bytes of each
tensor storage. The pickle names classes and functions that `torch.load`
would import and call. This reader imports none of them: it resolves only the
records a weights-only module tree needs (script-module objects, the tensor
rebuild function, storage types, `OrderedDict`, `build_intlist`) to local
stand-ins, and refuses any other global before anything is looked up.

The result is a tree of `ScriptObject`s, whose `.type_name` is the
TorchScript class (e.g. `__torch__.inceptionv3.Conv2dLayer`) and whose
`.state` maps attribute names to NumPy arrays, numbers, lists and children.
"""

from __future__ import annotations

import collections
import io
import operator
import pickle
import re
import zipfile

import numpy as np

from vqjax.weights.numpy_pickle import UnsafePickleError

# Storage class name -> little-endian NumPy dtype of its raw bytes (shared with
# `torch_state_dict`, which adds BFloat16Storage).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
_SCRIPT_NAME = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScriptObject:
  """Stand-in for a pickled TorchScript module: its class name and attributes."""

  type_name = "?"

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise UnsafePickleError(f"{self.type_name}: expected a dict of attributes, got "
                              f"{type(state).__name__}")
    self.state = dict(state)

  def __getitem__(self, key):
    return self.state[key]

  def children(self) -> dict[str, ScriptObject]:
    return {k: v for k, v in self.state.items() if isinstance(v, ScriptObject)}

  def __repr__(self):
    return f"ScriptObject({self.type_name}, {sorted(self.state)})"


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])


def _script_class(qualified: str) -> type:
  # A fresh subclass per TorchScript class name: NEWOBJ calls object.__new__ on
  # it and BUILD calls the __setstate__ above; nothing else can run.
  return type("ScriptObject", (ScriptObject,), {"type_name": qualified})


def tensor_record(storage_numel: int, offset, size, stride
                  ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """`(offset, size, stride)` of a pickled tensor as ints, checked to lie inside its storage.

  Shared with `torch_state_dict`. Raises `UnsafePickleError` for a record that is not
  integers or that would read outside the `storage_numel` elements of its storage.
  """
  try:
    offset = operator.index(offset)
    size = tuple(operator.index(s) for s in size)
    stride = tuple(operator.index(s) for s in stride)
  except TypeError as e:
    raise UnsafePickleError(f"tensor record with non-integer offset, size or stride ({e})") \
        from None
  if len(size) != len(stride):
    raise UnsafePickleError(f"tensor record with size {size} but stride {stride}")
  if min(size, default=0) < 0 or offset < 0:
    raise UnsafePickleError(f"tensor record with size {size} offset {offset}")
  if 0 in size:  # empty: reads nothing
    return offset, size, stride
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
  if extent > storage_numel or min(stride, default=0) < 0:
    raise UnsafePickleError(f"tensor of size {size} stride {stride} offset {offset} runs past "
                            f"its storage of {storage_numel} elements")
  return offset, size, stride


def copy_strided(storage: np.ndarray, offset, size, stride) -> np.ndarray:
  """A new array `out[i...] = storage[offset + sum(i * stride)]`, bounds checked first."""
  offset, size, stride = tensor_record(storage.size, offset, size, stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  del requires_grad, hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise UnsafePickleError("tensor record does not point at a storage")
  tensor = copy_strided(storage, offset, size, stride)
  return tensor[()] if tensor.ndim == 0 else tensor  # 0-d: a NumPy scalar


def _build_intlist(values):
  return [int(v) for v in values]


class TorchScriptUnpickler(pickle.Unpickler):
  """Admits script-module objects, tensors and storages; refuses everything else."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._root = root
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if module.startswith("__torch__") and _SCRIPT_NAME.fullmatch(module) and \
        _IDENTIFIER.fullmatch(name):
      return _script_class(f"{module}.{name}")
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name == "build_intlist":
      return _build_intlist
    raise UnsafePickleError(
        f"refusing to load {module}.{name}: a TorchScript weight file may only hold "
        "script modules, tensors and storages. The file is corrupt or not the one vqjax "
        "expects; reinstall the package that ships it.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in a TorchScript file")
    _, storage_type, key, _location, numel = pid
    key = str(key)
    if not key.isdigit():
      raise UnsafePickleError(f"bad storage key {key!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._root}/data/{key}")
      array = np.frombuffer(raw, dtype=storage_type.dtype)
      if array.size < int(numel):
        raise UnsafePickleError(f"storage {key} holds {array.size} values, expected {numel}")
      self._storages[key] = array.astype(storage_type.dtype.newbyteorder("="), copy=False)
    return self._storages[key]


def read_torchscript(path: str) -> ScriptObject:
  """The module tree of a TorchScript zip (`torch.jit.save` output), torch not needed."""
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable TorchScript zip archive ({e}); reinstall the "
                     "package that ships it.") from e
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {pickles}")
    root = pickles[0].split("/")[0]
    tree = TorchScriptUnpickler(archive.read(pickles[0]), archive, root).load()
  if not isinstance(tree, ScriptObject):
    raise ValueError(f"{path}: the pickle does not hold a script module")
  return tree
