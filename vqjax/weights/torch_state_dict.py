"""Read a PyTorch `torch.save` state dict into NumPy arrays, executing nothing.

`torch.save` pickles the object (here a dict of name -> tensor) and writes the
tensors' storages beside the pickle. Each tensor is pickled as a call of
`torch._utils._rebuild_tensor_v2` (or, before torch 0.4, `_rebuild_tensor`)
on a storage, which the pickle names by a persistent id. Two layouts exist:

* the zip format (torch >= 1.6): a zip holding `<root>/data.pkl` (the pickle),
  `<root>/data/<key>` (the raw bytes of each storage, little-endian unless
  `<root>/byteorder` says big) and small records such as `<root>/version`. A
  storage's persistent id is `('storage', storage_type, key, location, numel)`.
* the legacy format (torch < 1.6, e.g. torchvision's `vgg16-397923af.pth`): a
  stream of pickles, namely the magic number 0x1950a86a20f9469cfc6c, the
  protocol version 1001, a dict of system info, the object (persistent ids
  `('storage', storage_type, root_key, location, numel, view_metadata)`, where
  `view_metadata` is None or `(view_key, offset, view_numel)` for a slice of the
  root storage), then a list of storage keys; after it, for each key in that
  order, an int64 element count and the storage's raw little-endian bytes.

The tar format of the earliest torch releases, older than both, is not read.

This reader imports no torch: it admits only the globals such a file needs
(the rebuild functions, the storage types and `collections.OrderedDict`) as
local stand-ins and refuses every other one with `UnsafePickleError` before it
is looked up. Tensors are first parsed into records (storage, offset, size,
stride), bounds-checked against the storage's declared size; the storages' bytes
are read only after that, and not at all by `torch_state_dict_layout`.
BFloat16 tensors come back as float32 (exactly: bfloat16 is float32's upper half).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile

import numpy as np

from vqjax.errors import UserError, WeightsNotFoundError
from vqjax.weights.numpy_pickle import UnsafePickleError
from vqjax.weights.torchscript_zip import STORAGE_DTYPES, copy_strided, tensor_record

_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Storage class name -> little-endian dtype of its raw bytes (bfloat16: its raw uint16 bits).
_RAW_DTYPES = {**STORAGE_DTYPES, "BFloat16Storage": "<u2"}
# Errors that malformed bytes raise inside pickle, zipfile and NumPy.
_PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                 AttributeError, OverflowError, MemoryError, zipfile.BadZipFile)


class TorchFileError(UserError, ValueError):
  """A file that is not a readable `torch.save` state dict; the message names the path."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def raw_dtype(self) -> np.dtype:
    return np.dtype(_RAW_DTYPES[self.name])

  @property
  def dtype(self) -> np.dtype:
    """The dtype of the arrays this reader returns (native byte order)."""
    if self.name == "BFloat16Storage":
      return np.dtype(np.float32)
    return self.raw_dtype.newbyteorder("=")


@dataclasses.dataclass(eq=False)
class _Storage:
  key: str
  type: _StorageType
  numel: int
  data: np.ndarray | None = None  # its elements (native byte order), once read


@dataclasses.dataclass(eq=False)
class _StorageSlice:
  """What a tensor record points at: `numel` elements of `root` from `offset` on."""
  root: _Storage
  offset: int
  numel: int


@dataclasses.dataclass(eq=False)
class _Tensor:
  storage: _StorageSlice
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return self.storage.root.type.dtype


def _text(value) -> str:
  # Python 2 pickles may give bytes where Python 3 gives str.
  return value.decode("ascii") if isinstance(value, bytes) else value


def _count(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise TorchFileError(f"{what} is {value!r}, not a count")
  return value


class _PlainUnpickler(pickle.Unpickler):
  """Numbers, strings and containers only: no globals, no persistent ids."""

  def __init__(self, file, path: str):
    super().__init__(file, encoding="utf-8")
    self._path = path

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(
        f"{self._path}: refusing to load {module}.{name}: a torch state dict file may only hold "
        "tensors, storages and plain containers. The file is corrupt or not the one expected; "
        "download it again.")

  def persistent_load(self, pid):
    raise TorchFileError(f"unexpected persistent id {pid!r}")


class _StateDictUnpickler(_PlainUnpickler):
  """Admits the tensor rebuild functions, storage types and OrderedDict; nothing else."""

  def __init__(self, file, path: str, legacy: bool):
    super().__init__(file, path)
    self._legacy = legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if module == "torch._utils":
      if name == "_rebuild_tensor_v2":
        return _rebuild_tensor
      if name == "_rebuild_tensor":
        return _rebuild_tensor_v1
      if name == "_rebuild_parameter":
        return _rebuild_parameter
    if module == "torch" and name in _RAW_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    return super().find_class(module, name)

  def persistent_load(self, pid):
    n_fields = 6 if self._legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n_fields and _text(pid[0]) == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(_text(pid[2]), str)):
      raise TorchFileError(f"unexpected persistent id {pid!r} (expected a storage with "
                           f"{n_fields} fields)")
    storage_type, key = pid[1], _text(pid[2])
    numel = _count(pid[4], f"the size of storage {key}")
    storage = self.storages.setdefault(key, _Storage(key, storage_type, numel))
    if (storage.type, storage.numel) != (storage_type, numel):
      raise TorchFileError(f"storage {key} is declared twice, differently")
    view = pid[5] if self._legacy else None
    if view is None:
      return _StorageSlice(storage, 0, numel)
    if not (isinstance(view, tuple) and len(view) == 3):
      raise TorchFileError(f"storage {key} has view metadata {view!r}")
    offset = _count(view[1], f"the offset of a view of storage {key}")
    view_numel = _count(view[2], f"the size of a view of storage {key}")
    if offset + view_numel > numel:
      raise TorchFileError(f"a view of {view_numel} elements at {offset} runs past storage "
                           f"{key} of {numel} elements")
    return _StorageSlice(storage, offset, view_numel)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> _Tensor:
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageSlice):
    raise TorchFileError("a tensor record does not point at a storage")
  try:
    return _Tensor(storage, *tensor_record(storage.numel, offset, size, stride))
  except UnsafePickleError as e:
    raise TorchFileError(str(e)) from None


def _rebuild_tensor_v1(storage, offset, size, stride) -> _Tensor:
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _Tensor:
  del requires_grad, backward_hooks
  if not isinstance(data, _Tensor):
    raise TorchFileError("a parameter record does not hold a tensor")
  return data


def _fill(out: np.ndarray, read_into, what: str) -> None:
  """Fill `out` from a binary stream's readinto, or fail naming `what`."""
  buffer = memoryview(out.reshape(-1)).cast("B")
  done = 0
  while done < len(buffer):
    n = read_into(buffer[done:])
    if not n:
      raise TorchFileError(f"{what} is cut short after {done} of {len(buffer)} bytes "
                           "(truncated file)")
    done += n


def _native(array: np.ndarray) -> np.ndarray:
  if not array.dtype.isnative:
    array = array.byteswap()
  return array.view(array.dtype.newbyteorder("="))


class _TorchFile:
  """One open `torch.save` file: `parse()` its object, then optionally `read_storages()`."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise WeightsNotFoundError(f"PyTorch weight file not found: {self.path}")
    if not os.path.isfile(self.path):
      raise TorchFileError(f"{self.path} is not a file, so not a PyTorch state dict file")
    with open(self.path, "rb") as f:
      self._head = f.read(512)
    if not self._head:
      raise TorchFileError(f"{self.path} is empty, not a PyTorch state dict file")
    self.legacy = not self._head.startswith(b"PK\x03\x04")
    if self.legacy:
      # The magic number is read from the file's head: a file that is no pickle at all
      # cannot make the unpickler ask the file for a huge read.
      head = io.BytesIO(self._head)
      try:
        magic = _PlainUnpickler(head, self.path).load()
      except Exception:  # any garbage: say what the file is not
        magic = None
      if self._head[257:262] == b"ustar":
        raise TorchFileError(f"{self.path} is a tar archive: the tar format of the earliest "
                             "torch releases is not read; re-save the state dict with a newer "
                             "torch")
      if isinstance(magic, bool) or magic != _MAGIC:
        raise TorchFileError(f"{self.path} is not a PyTorch torch.save file: neither a zip "
                             "archive nor a legacy pickle stream starting with torch's magic "
                             "number")
      self._magic_end = head.tell()
    self._file = open(self.path, "rb")
    self._archive: zipfile.ZipFile | None = None
    self._root = ""
    self._storages: dict[str, _Storage] = {}

  def close(self) -> None:
    if self._archive is not None:
      self._archive.close()
    self._file.close()

  def parse(self):
    """The unpickled object, its tensors as `_Tensor` records (no storage bytes read)."""
    if self.legacy:
      return self._parse_legacy()
    return self._parse_zip()

  def _parse_legacy(self):
    f = self._file
    f.seek(self._magic_end)
    protocol = _PlainUnpickler(f, self.path).load()
    if protocol != _LEGACY_PROTOCOL:
      raise TorchFileError(f"legacy protocol version {protocol!r}, expected {_LEGACY_PROTOCOL}")
    if not isinstance(_PlainUnpickler(f, self.path).load(), dict):
      raise TorchFileError("the system info record is not a dict")
    # Storages are always written little-endian (torch converts on big-endian hosts).
    unpickler = _StateDictUnpickler(f, self.path, legacy=True)
    tree = unpickler.load()
    self._storages = unpickler.storages
    return tree

  def _parse_zip(self):
    self._archive = archive = zipfile.ZipFile(self._file)
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if len(pickles) != 1:
      raise TorchFileError(f"expected one <root>/data.pkl in the zip archive, found {pickles}")
    self._root = root = pickles[0].split("/")[0]
    if f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names):
      raise TorchFileError("it is a TorchScript archive (torch.jit.save), not a torch.save "
                           "state dict")
    byteorder = "little"
    if f"{root}/byteorder" in names:
      byteorder = archive.read(f"{root}/byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise TorchFileError(f"byteorder record {byteorder!r}")
    self._byteorder = "<" if byteorder == "little" else ">"
    unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), self.path, legacy=False)
    tree = unpickler.load()
    self._storages = unpickler.storages
    return tree

  def read_storages(self) -> None:
    """Read the bytes of every storage the parsed object points at."""
    if self.legacy:
      self._read_legacy_storages()
    else:
      self._read_zip_storages()

  def _read_legacy_storages(self) -> None:
    f = self._file
    keys = _PlainUnpickler(f, self.path).load()
    if not isinstance(keys, list):
      raise TorchFileError("the storage key list is not a list")
    file_size = os.fstat(f.fileno()).st_size
    for key in map(_text, keys):
      storage = self._storages.get(key) if isinstance(key, str) else None
      if storage is None:
        raise TorchFileError(f"the file holds the bytes of storage {key!r}, which no tensor uses")
      header = f.read(8)
      if len(header) != 8:
        raise TorchFileError(f"storage {key} is missing (truncated file)")
      numel = int.from_bytes(header, "little", signed=True)
      if numel != storage.numel:
        raise TorchFileError(f"storage {key} holds {numel} elements, its tensors expect "
                             f"{storage.numel}")
      raw_dtype = storage.type.raw_dtype
      if numel * raw_dtype.itemsize > file_size - f.tell():
        raise TorchFileError(f"storage {key} of {numel} elements runs past the end of the file "
                             "(truncated file)")
      data = np.empty(numel, raw_dtype)
      _fill(data, f.readinto, f"storage {key}")
      storage.data = _native(data)

  def _read_zip_storages(self) -> None:
    archive = self._archive
    assert archive is not None
    for key, storage in self._storages.items():
      name = f"{self._root}/data/{key}"
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise TorchFileError(f"storage {key} is missing: no {name} in the zip archive") from None
      raw_dtype = storage.type.raw_dtype.newbyteorder(self._byteorder)
      nbytes = storage.numel * raw_dtype.itemsize
      if info.file_size < nbytes:
        raise TorchFileError(f"storage {key} holds {info.file_size} bytes, its {storage.numel} "
                             f"{storage.type.name} elements need {nbytes}")
      data = np.empty(storage.numel, raw_dtype)
      with archive.open(info) as member:
        _fill(data, member.readinto, f"storage {key}")
      storage.data = _native(data)

  def arrays(self, tree):
    """`tree` with each tensor record replaced by its NumPy array (after `read_storages`)."""
    users = collections.Counter()
    _walk(tree, lambda t: users.update([id(t.storage.root)]))

    def to_array(t: _Tensor) -> np.ndarray:
      root, data = t.storage.root, t.storage.root.data
      if data is None:
        raise TorchFileError(f"the bytes of storage {root.key} are missing from the file")
      data = data[t.storage.offset:t.storage.offset + t.storage.numel]
      if users[id(root)] == 1 and t.offset == 0 and _covers(data.size, t.size, t.stride):
        array = data.reshape(t.size)  # the storage is this tensor's alone: no copy
      else:
        array = copy_strided(data, t.offset, t.size, t.stride)
      if root.type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
      return array

    return _walk(tree, to_array)


def _covers(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  """Whether a tensor is C-contiguous and spans all `numel` elements of its storage."""
  expected = 1
  for n, s in reversed(list(zip(size, stride, strict=True))):
    if n != 1 and s != expected:
      return False
    expected *= n
  return expected == numel


def _walk(tree, leaf):
  """`tree` rebuilt with `leaf(t)` for each tensor record (dicts come back as plain dicts)."""
  if isinstance(tree, _Tensor):
    return leaf(tree)
  if isinstance(tree, dict):
    return {k: _walk(v, leaf) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_walk(v, leaf) for v in tree)
  return tree


def _read(path: str, with_storages: bool):
  torch_file = _TorchFile(path)
  try:
    tree = torch_file.parse()
    if not isinstance(tree, dict):
      raise TorchFileError(f"it holds a {type(tree).__name__}, not a state dict (a dict of "
                           "tensors)")
    if with_storages:
      torch_file.read_storages()
      return torch_file.arrays(tree)
    return tree
  except UnsafePickleError:
    raise
  except TorchFileError as e:
    raise TorchFileError(f"{torch_file.path} is not a readable PyTorch state dict file: {e}") \
        from None
  except _PARSE_ERRORS as e:
    kind = "zip archive" if not torch_file.legacy else "legacy pickle stream"
    raise TorchFileError(f"{torch_file.path} is not a readable PyTorch state dict file: its "
                         f"{kind} is corrupt or truncated ({type(e).__name__}: {e})") from None
  finally:
    torch_file.close()


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """name -> NumPy array (native byte order) of a `torch.save` state dict, torch not needed.

  Nested dicts (e.g. `{"state_dict": {...}}`) come back as dicts; other values as they were
  pickled. A missing file raises `WeightsNotFoundError`, a file that is not a readable
  state dict `TorchFileError`, a pickle naming any other global `UnsafePickleError`.
  """
  return _read(path, with_storages=True)


def torch_state_dict_layout(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """name -> (NumPy dtype name, shape) of each tensor, without reading the storages' bytes.

  Parses only the pickle (`data.pkl` of a zip; the object pickle of a legacy file), so it
  is cheap on large files. Nested dicts come back as dicts; values that are neither tensors
  nor dicts are left out. Errors as in `load_torch_state_dict`.
  """
  def layout(tree):
    out = {}
    for k, v in tree.items():
      if isinstance(v, _Tensor):
        out[k] = (v.dtype.name, v.size)
      elif isinstance(v, dict):
        out[k] = layout(v)
    return out

  return layout(_read(path, with_storages=False))
